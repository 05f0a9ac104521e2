"""The typed config of `diagnostics train risk` (YAML in configs/risk/, `--set` overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from diagnostics.configio import ConfigError, apply_overrides, load_yaml, validation_lines
from diagnostics.tables import TableSchema
from diagnostics.train.config import EvalConfig, TrackingConfig


class RiskModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    estimator: Literal["logistic", "hist_gradient_boosting", "random_forest"] = "logistic"
    params: dict[str, Any] = Field(default_factory=dict)
    # numeric features into the model: linear (scaled), bins (quantile one-hot) or splines
    # (B-splines), e.g. "splines" or {kind: splines, n_knots: 5}; both export exactly to ONNX
    numeric_transform: str | dict[str, Any] = "linear"
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
    strategy: Literal["random", "leave_one_group_out"] = Field(
        "random",
        description="random: held-out test split + CV folds; leave_one_group_out: fit on all "
        "groups but one, predict that one (e.g. leave-one-site-out), then fit on all rows",
    )
    group: str | None = Field(
        None,
        description="the column to group by for leave_one_group_out: the schema's site_column "
        "or patient_column, or a subgroup name",
    )

    @model_validator(mode="after")
    def _group(self) -> RiskSplitConfig:
        if self.strategy == "leave_one_group_out" and not self.group:
            raise ValueError("split.strategy leave_one_group_out needs split.group (e.g. SiteNo)")
        return self


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

    @model_validator(mode="after")
    def _split_group(self) -> RiskTrainConfig:
        g, schema = self.split.group, self.table_schema
        known = [schema.site_column, schema.patient_column, *schema.subgroups]
        if g is not None and g not in known:
            raise ValueError(
                f"split.group {g!r} must be the schema's site_column, patient_column or a "
                f"subgroup name ({[k for k in known if k]})"
            )
        return self


def load_risk_config(path: str | Path, overrides: list[str] | None = None) -> RiskTrainConfig:
    raw = apply_overrides(load_yaml(path), overrides or [])
    try:
        return RiskTrainConfig.model_validate(raw)
    except ValidationError as exc:
        where = f"{path} with --set overrides" if overrides else str(path)
        raise ConfigError(f"{where}: invalid risk config:\n{validation_lines(exc)}") from None
