"""Contracts shared by the training side and the clinic side. Torch-free (numpy and pydantic).

- The preprocessing parameters. They travel inside the model's metadata, so that evaluation,
  ONNX export parity and serving all run the same numpy preprocessing
  (`diagnostics.imaging.preprocess`) with the same parameters.
- The decision: the calibrated probability (`calibrated_probability`) and the call
  (`is_positive`), one definition for training, export and serving.
- The model's metadata (`ModelMetadata`) and a finding (`Finding`).
- The harmonised finding vocabulary (`FINDINGS`) and a model file's identity (`file_sha256`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# The 14 NIH ChestX-ray14 findings first (Wang et al. 2017), then the other datasets' findings.
NIH14 = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
FINDINGS: tuple[str, ...] = (
    *NIH14,
    "No_Finding",
    # CheXpert / MIMIC-CXR
    "Enlarged_Cardiomediastinum",
    "Lung_Opacity",
    "Lung_Lesion",  # nodule or mass, as CheXpert and VinDr ("Nodule/Mass", "Lung tumor") use it
    "Fracture",
    "Support_Devices",
    "Pleural_Other",
    # VinDr-CXR
    "Aortic_Enlargement",
    "Calcification",
    "ILD",
    "Other_Lesion",
    "Tuberculosis",
    "COPD",
)


def file_sha256(path: str | Path) -> str:
    """A file's sha256 (hex): a model file's identity, recorded with every finding it makes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


# --------------------------------------------------------------------------- the decision

# logit / T is clipped to +-LOGIT_CLIP before the sigmoid: exp() never overflows, and the
# probability still reaches 1e-26 of 0 or 1
LOGIT_CLIP = 60.0


def calibrated_probability(logits: Any, temperature: Any = 1.0) -> np.ndarray:
    """The calibrated probability of a finding: sigmoid(logit / T), float64.

    `logits` (..., F) or any shape, `temperature` a scalar or (F,) broadcast against it. The
    ONE place the rule lives: training (temperature fitting, evaluation), export parity and
    serving call it. A non-finite logit gives NaN, never a confident 0 or 1.
    """
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(temperature, dtype=np.float64)
    p = 1.0 / (1.0 + np.exp(-np.clip(z / t, -LOGIT_CLIP, LOGIT_CLIP)))
    return np.where(np.isfinite(z), p, np.nan)


def is_positive(probability: Any, threshold: Any) -> Any:
    """The call: positive when the calibrated probability is at or above the threshold.
    Scalars give a bool, arrays a bool array; NaN is never positive."""
    out = np.greater_equal(probability, threshold)
    return bool(out) if np.ndim(out) == 0 else out


# --------------------------------------------------------------------------- model metadata

SCHEMA_VERSION = "1"
METADATA_KEY = "diagnostics"  # ONNX metadata_props key holding ModelMetadata as JSON


class Threshold(BaseModel):
    """The operating point of one finding, on the calibrated probability."""

    model_config = ConfigDict(extra="forbid")

    value: float = Field(ge=0.0, le=1.0)
    policy: str  # e.g. "youden", "sensitivity>=0.9"
    sensitivity: float | None = None  # on the validation split, at this threshold
    specificity: float | None = None


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "image"
    shape: list[int | str]  # e.g. ["batch", 1, 224, 224]
    dtype: str = "float32"


class OODReference(BaseModel):
    """Where the training images lie in the model's pooled-feature space, for input QC.

    A probabilistic PCA (Tipping & Bishop 1999) of the `embedding` output on training images:
    `k` principal directions with their variances, plus one variance for everything else. The
    score of an image is its Mahalanobis distance under that model, divided by sqrt(dim): of
    order 1 for training images (below 1, as the variance floors widen the model). `threshold`
    is a high quantile of the scores of held-out validation images times a margin. Arrays are
    base64 float32, little-endian.
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["ppca-mahalanobis"] = "ppca-mahalanobis"
    dim: int = Field(ge=1)  # C, the embedding width
    mean: str  # (C,)
    components: str  # (k, C), orthonormal rows
    variances: list[float]  # (k,), floored
    residual_variance: float = Field(gt=0)
    threshold: float = Field(gt=0)
    quantile: float  # of validation scores that set the threshold
    margin: float
    fitted_on: int  # training images
    validation_scores: dict[str, float] = Field(default_factory=dict)  # median, q99, max


class PopulationCheck(BaseModel):
    """The model's own measured judgement of whether an image comes from its intended population.

    A logistic head on the pooled features, trained inside the exported graph with images from
    outside the population as negatives (e.g. adult chests for a paediatric model). Its output
    `output` (B,) is a logit: an image scores inside when the logit is at or above `threshold`.
    `rule` says in words how the threshold was set; `metrics` holds what was measured at training
    time on images the head never saw (held-out outside images, the validation split).
    """

    model_config = ConfigDict(extra="forbid")

    method: Literal["population-head"] = "population-head"
    output: str = "population"
    threshold: float
    rule: str
    # the rule's numbers: the threshold refuses at most this share of in-population images,
    # and is never above `outside_bound`, the lowest logit that refused the required share of
    # the calibration outside images (None: not set that way)
    max_inside_refused: float = Field(0.01, gt=0.0, lt=0.5)
    outside_bound: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class Population(BaseModel):
    """Who the model was made for. QC refuses (or flags, where a site chooses) anyone else.

    `age_years` is a half-open range [min, max) in years: (1, 6) admits ages from the first to
    the sixth birthday, "1 to 5 years" as a clinician says it.
    """

    model_config = ConfigDict(extra="forbid")

    age_years: tuple[float, float] | None = None
    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    views: list[str] = Field(default_factory=lambda: ["PA", "AP"])
    description: str = ""  # where the training images came from, in plain words
    check: PopulationCheck | None = None

    @model_validator(mode="after")
    def _range(self) -> Population:
        if self.age_years is not None:
            lo, hi = self.age_years
            if not 0 <= lo < hi <= 150:
                raise ValueError("age_years is [min, max) with 0 <= min < max <= 150")
        self.modalities = [m.strip().upper() for m in self.modalities]
        self.views = [v.strip().upper() for v in self.views]
        return self

    def age_inside(self, age_years: float) -> bool:
        if self.age_years is None:
            return True
        lo, hi = self.age_years
        return lo <= age_years < hi

    def age_text(self) -> str:
        """'1 to 5 years' for (1, 6): whole years as clinicians count them."""
        if self.age_years is None:
            return "any age"
        lo, hi = self.age_years
        if float(lo).is_integer() and float(hi).is_integer():
            return f"{int(lo)} to {int(hi) - 1} years"
        return f"{lo:g} to under {hi:g} years"


class OperatingPoint(BaseModel):
    """How one finding's call was made: the temperature and threshold it was judged by, how
    the threshold was chosen and what it gave where it was chosen. Stored with every finding,
    so that a study explains itself whatever model serves later.

    `source`: `model` (the model file's own, chosen on its validation split) or `site_profile`
    (a site's own, fitted on that site's labelled images: `profile_id` names the profile, and
    sensitivity/specificity are on those images)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(ge=0.0, le=1.0)
    temperature: float = Field(gt=0.0)
    policy: str
    sensitivity: float | None = None
    specificity: float | None = None
    source: Literal["model", "site_profile"] = "model"
    profile_id: int | None = None


class Finding(BaseModel):
    """One label's result for one image. `positive` is None when no call is made: the image is
    outside the model's intended population and the site chose to score it with a flag."""

    label: str
    probability: float = Field(ge=0.0, le=1.0)  # calibrated
    threshold: float
    positive: bool | None
    heatmap: str | None = None  # file name of the CAM overlay PNG, positive findings only
    logit: float | None = None  # raw model output, before the temperature
    operating_point: OperatingPoint | None = None  # what `threshold` and `positive` came from


class Int8Gate(BaseModel):
    """Whether an int8 model may stand in for its fp32 twin at the clinic, measured at training
    time on the validation split (`diagnostics.train.int8_gate`).

    - `auroc_delta`: the worst finding's |AUROC(int8) - AUROC(fp32)| (`auroc_finding` names it);
      at most `max_auroc_delta`.
    - `cam_correlation`: the mean Pearson correlation of the int8 CAM with the fp32 CAM over
      `n_cam` sampled (image, finding) pairs, at least `min_cam_correlation`; `same_peak`: the
      share of those pairs whose hottest CAM cell is the same (or a neighbour, or a tie within 1%
      of the map's range), at least `min_same_peak`.
    `reason` is "passed" or "failed:<what>" (the MLflow tag `int8_gate` holds it)."""

    model_config = ConfigDict(extra="forbid")

    passed: bool
    reason: str
    auroc_delta: float | None = None
    auroc_finding: str | None = None
    auroc_deltas: dict[str, float] = Field(default_factory=dict)  # signed, per finding
    cam_correlation: float | None = None
    cam_correlation_min: float | None = None
    same_peak: float | None = None
    max_prob_diff: float | None = None
    n: int = 0  # validation images
    n_cam: int = 0  # (image, finding) CAM pairs
    max_auroc_delta: float = 0.005
    min_cam_correlation: float = 0.95
    min_same_peak: float = 0.95


class ModelMetadata(BaseModel):
    """Everything a clinic needs to run and trust a model file, stored inside the ONNX file.

    Outputs: `logits` (B, F) in label order, and optionally `cam` (B, F, h, w) in logit units.
    Calibrated probability of finding i = sigmoid(logits[:, i] / temperature[i]).
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: str = SCHEMA_VERSION
    task: Literal["cxr", "risk"]
    name: str  # registered model name, e.g. "cxr-pneumonia"
    architecture: str  # e.g. "resnet18"
    labels: list[str]
    temperature: list[float]  # one per label; 1.0 = uncalibrated
    thresholds: dict[str, Threshold]
    preprocessing: PreprocessSpec | None = None  # CXR models
    input: InputSpec | None = None  # CXR models; risk models take one named input per feature
    table_schema: dict[str, Any] | None = None  # risk models: the validated table schema
    outputs: list[str] = Field(default_factory=lambda: ["logits", "cam", "embedding"])
    ood: OODReference | None = None  # CXR models: the reference for out-of-distribution QC
    population: Population | None = None  # CXR models: who the model was made for
    quantization: str | None = None  # e.g. "int8-static-qdq-per-channel"; None = fp32
    int8_gate: Int8Gate | None = None  # int8 files: the training-time check against fp32
    # Provenance
    run_id: str | None = None
    dataset_digest: str | None = None
    dataset_name: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)  # validation, flat names
    created: str  # ISO 8601, UTC
    package_version: str
    intended_use: str = ""
    limitations: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> ModelMetadata:
        if len(self.temperature) != len(self.labels):
            raise ValueError("temperature needs one value per label")
        if any(t <= 0 for t in self.temperature):
            raise ValueError("temperatures must be > 0")
        missing = set(self.labels) - set(self.thresholds)
        if missing:
            raise ValueError(f"thresholds missing for {sorted(missing)}")
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        return cls.model_validate_json(text)

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelMetadata:
        """From ONNX metadata_props (or ORT's custom_metadata_map)."""
        if METADATA_KEY not in props:
            raise ValueError(f"the model file has no '{METADATA_KEY}' metadata: not exported here")
        return cls.from_json(props[METADATA_KEY])
