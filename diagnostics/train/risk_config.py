"""The typed config of `diagnostics train risk` (YAML in configs/risk/, `--set` overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diagnostics.configio import ConfigError, apply_overrides, load_yaml, validation_lines
from diagnostics.tables import TableSchema
from diagnostics.train.config import EvalConfig, TrackingConfig


class RiskModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    estimator: Literal["logistic", "hist_gradient_boosting", "random_forest"] = "logistic"
    params: dict[str, Any] = Field(default_factory=dict)
    calibration: Literal["sigmoid", "isotonic"] = "sigmoid"
    calibration_cv: int = Field(5, ge=2)
    search: dict[str, list[Any]] | None = Field(
        None, description="optional grid over estimator params, e.g. {C: [0.1, 1, 10]}"
    )


class RiskSplitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    test_fraction: float = Field(0.25, gt=0, lt=1)
    cv_folds: int = Field(5, ge=2)
    seed: int = 0


class RiskTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    table: str = Field(description="CSV/Parquet path, or sklearn:breast_cancer (bundled)")
    table_schema: TableSchema = Field(alias="schema")
    model: RiskModelConfig = Field(default_factory=RiskModelConfig)
    split: RiskSplitConfig = Field(default_factory=RiskSplitConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="risk"))
    intended_use: str = "Research use: decision support. Not a diagnosis."
    limitations: str = ""


def load_risk_config(path: str | Path, overrides: list[str] | None = None) -> RiskTrainConfig:
    raw = apply_overrides(load_yaml(path), overrides or [])
    try:
        return RiskTrainConfig.model_validate(raw)
    except ValidationError as exc:
        where = f"{path} with --set overrides" if overrides else str(path)
        raise ConfigError(f"{where}: invalid risk config:\n{validation_lines(exc)}") from None
