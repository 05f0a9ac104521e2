"""Typed training configs from YAML in configs/, with `--set a.b=value` overrides. No extra keys."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from diagnostics.configio import ConfigError, apply_overrides, load_yaml, validation_lines
from diagnostics.contract import PreprocessSpec
from diagnostics.data.config import SOURCES, DatasetConfig

_POLICY = re.compile(r"^(youden|(sensitivity|specificity)>=(0(\.\d+)?|1(\.0+)?))$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    name: str = "resnet18"
    pretrained: bool = Field(False, description="ImageNet weights (downloaded once; needs network)")
    weights_path: Path | None = Field(None, description="local state dict instead of a download")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    options: dict[str, Any] = Field(default_factory=dict, description="extra factory arguments")


class AugmentConfig(_Strict):
    """Training-only augmentation, per image, on the [0, 1] image before normalisation."""

    enabled: bool = True
    rotate_degrees: float = Field(7.0, ge=0)
    translate: float = Field(0.05, ge=0, le=0.5)  # fraction of the side
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = Field(0.1, ge=0, le=1)
    contrast: float = Field(0.1, ge=0, le=1)
    hflip: bool = False  # off: left-right carries anatomy (heart, aortic knob) in a CXR


class LoopConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    patience: int = Field(3, ge=1, description="epochs without a better val mean AUROC")
    pos_weight: Literal["none", "balanced"] = "none"
    mixed_precision: bool = Field(True, description="AMP on CUDA, bf16 on CPUs that have it")
    channels_last: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="for quick tests")


class EvalConfig(_Strict):
    threshold_policy: str = "youden"
    bootstrap: int = Field(1000, ge=0, description="resamples for 95% CIs; 0 = none")
    calibrate: bool = True
    ece_bins: int = Field(10, ge=2)
    parity_images: int = Field(16, ge=1, description="real images for the ONNX parity check")
    int8: bool = Field(
        False, description="also export a static int8 model (model.int8.onnx), checked on val"
    )
    int8_calibration_images: int = Field(64, ge=1)
    # Out-of-distribution reference for input QC (train/ood.py), stored in the model metadata.
    ood_images: int = Field(2000, ge=2, description="training images the reference is fitted on")
    ood_components: int = Field(32, ge=1, description="principal directions kept")
    ood_quantile: float = Field(0.995, gt=0.5, le=1.0, description="of validation scores")
    ood_margin: float = Field(1.5, ge=1.0, description="threshold = quantile x margin")

    @field_validator("threshold_policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        v = v.replace(" ", "")
        if not _POLICY.match(v):
            raise ValueError("threshold_policy is youden, sensitivity>=x or specificity>=x")
        return v


class TrackingConfig(_Strict):
    experiment: str = "cxr"
    registered_model: str | None = Field("cxr-model", description="None: do not register")


class CXRTrainConfig(_Strict):
    name: str = Field("cxr", description="run name prefix")
    data: DatasetConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: LoopConfig = Field(default_factory=LoopConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    intended_use: str = "Research use: decision support for chest X-ray reading. Not a diagnosis."
    limitations: str = ""


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> CXRTrainConfig:
    """Read, override and validate. Raises ConfigError with one line per problem."""
    raw = apply_overrides(load_yaml(path), overrides or [])
    try:
        return CXRTrainConfig.model_validate(raw)
    except ValidationError as exc:
        where = f"{path} with --set overrides" if overrides else str(path)
        lines = validation_lines(exc, skip=SOURCES)
        raise ConfigError(f"{where}: invalid training config:\n{lines}") from None
