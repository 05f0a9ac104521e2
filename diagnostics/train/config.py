"""Typed training configs from YAML in configs/, with `--set a.b=value` overrides. No extra keys."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    # Site processing (data.augment.acquisition): tone curve log-range, unsharp-mask strength
    # (blur down to -1), noise standard deviation. 0 = off.
    gamma: float = Field(0.0, ge=0, le=1)
    sharpness: float = Field(0.0, ge=0, le=3)
    noise: float = Field(0.0, ge=0, le=0.2)
    # probability that what a zoom-out or shift uncovers is white (collimator shutters), not air
    white_border: float = Field(0.0, ge=0, le=1)


class LoopConfig(_Strict):
    epochs: int = Field(10, ge=1)
    # Which weights are kept: "val_auroc" (best validation mean AUROC; early stopping with
    # `patience`), "val_loss" (lowest validation log loss), or "last" (the end of the fixed
    # schedule; no choice made on validation at all, for a validation split that saturates).
    select: Literal["val_auroc", "val_loss", "last"] = "val_auroc"
    # Exponential moving average of the weights (and BatchNorm statistics), updated every
    # step; the average is what is validated, kept and exported. None: off.
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="targets y(1-e) + e/2")
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


class OutsideImagesConfig(_Strict):
    """Images from outside the intended population (e.g. adult chests for a paediatric model):
    a CSV with a path column. Paths are relative to `root`, by default the CSV's folder."""

    labels_file: Path
    root: Path | None = None
    path_column: str = "path"
    group_column: str | None = Field(None, description="a column to report refusals by")


class PopulationCheckConfig(_Strict):
    """A population head trained in the same network: inside-population training images are
    positives, a part of the outside images negatives. Of the other outside images, one part
    calibrates the threshold and the rest is held out to report on."""

    outside: OutsideImagesConfig
    fit_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="share of outside images that train the head"
    )
    calibrate_fraction: float = Field(
        0.25, gt=0.0, lt=1.0, description="share of outside images that set the threshold"
    )
    weight: float = Field(1.0, gt=0.0, description="weight of its loss beside the findings'")
    # The rule that sets the threshold: as lenient to inside images as the calibration outside
    # images allow (still refusing `min_outside_refused` of them), and never refusing more
    # than `max_inside_refused` of the validation images (which are all inside).
    min_outside_refused: float = Field(0.99, gt=0.5, le=1.0)
    max_inside_refused: float = Field(0.01, gt=0.0, lt=0.5)

    @model_validator(mode="after")
    def _parts(self) -> PopulationCheckConfig:
        if self.fit_fraction + self.calibrate_fraction >= 1.0:
            raise ValueError("fit_fraction + calibrate_fraction must leave images to report on")
        return self


class PopulationConfig(_Strict):
    """Who the model is made for; travels in the model metadata (`contract.Population`)."""

    age_years: tuple[float, float] | None = Field(
        None, description="[min, max) in years; (1, 6) = from the 1st to the 6th birthday"
    )
    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    views: list[str] = Field(default_factory=lambda: ["PA", "AP"])
    description: str = ""
    check: PopulationCheckConfig | None = None


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
    population: PopulationConfig | None = None
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
