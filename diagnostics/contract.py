"""Contracts shared by the training side and the clinic side. Torch-free.

For now this holds the preprocessing parameters. They travel inside the model's metadata, so that
evaluation, ONNX export parity and serving all run the same numpy preprocessing
(`diagnostics.imaging.preprocess`) with the same parameters.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Bump when `imaging.preprocess` changes its output for the same parameters. Findings record it.
PREPROCESS_VERSION = "1"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PreprocessSpec(BaseModel):
    """How a decoded grey image in [0, 1] becomes a model input tensor (C, size, size), float32.

    - `crop`: `center` crops the long side to a square; `letterbox` pads the short side with 0
      (air, black); `squash` resizes without keeping the aspect ratio.
    - `normalize`: `unit` keeps [0, 1]; `imagenet` applies the ImageNet mean/std per channel;
      `fixed` applies `mean`/`std` given here (one value, or one per channel).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(224, ge=8, le=4096, description="output side in pixels")
    channels: Literal[1, 3] = 1
    crop: Literal["center", "letterbox", "squash"] = "letterbox"
    normalize: Literal["unit", "imagenet", "fixed"] = "unit"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    version: str = PREPROCESS_VERSION

    @model_validator(mode="after")
    def _check_stats(self) -> PreprocessSpec:
        if self.normalize == "fixed":
            for name, values in (("mean", self.mean), ("std", self.std)):
                if len(values) not in (1, self.channels):
                    raise ValueError(f"{name} needs 1 or {self.channels} values, got {len(values)}")
            if any(s <= 0 for s in self.std):
                raise ValueError("std values must be > 0")
        if self.normalize == "imagenet" and self.channels != 3:
            raise ValueError("imagenet normalisation needs channels=3")
        return self
