"""Input quality control: refuse what the model was not made for, and say why. Torch-free.

Four stages, each returning `QCResult`s with a stable `code` and a plain message:

- intake (`check_intake`): from the file header alone, cheap enough to answer an upload at once:
  format, truncation, pixel data, frames, photometric, transfer syntax, pixel cap, modality,
  body part and view from the DICOM tags.
- image (`check_image`): on decoded pixels: size, constant images, colour photographs.
- model (`OODDetector`): distance of the model's pooled features to the training distribution,
  with the reference stored in the model metadata at export time.
- population (`check_population`): is the patient one the model was made for? By the age in
  the DICOM header when there is one, else by the model's own population check (a head in the
  exported graph, with a threshold measured at training time). A site chooses in `serve.yaml`
  whether a patient outside the population is refused or scored with a flag and no call.

A refusal is never a score. Codes are part of the API: clinics and reviewers see them.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from diagnostics.contract import OODReference, Population
from diagnostics.imaging import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    HeaderInfo,
    ImageError,
    inspect_header,
)

# Codes QC itself adds to those of `imaging.ImageError` (unsupported_format, truncated_file, ...).
MODALITY = "modality_not_supported"
BODY_PART = "body_part_not_chest"
VIEW = "view_not_frontal"
TOO_SMALL = "image_too_small"
CONSTANT = "constant_image"
COLOUR = "colour_image"
OOD = "out_of_distribution"
INVALID_UID = "invalid_uid"
NON_FINITE = "non_finite_output"  # the model produced NaN or Inf: the job fails, nothing stored
OUTSIDE_POPULATION = "outside_intended_population"


class QCConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    # Missing tags pass (PNG/JPEG have none); present ones must match.
    body_parts: list[str] = Field(default_factory=lambda: ["CHEST", "THORAX", "LUNG"])
    views: list[str] = Field(default_factory=lambda: ["PA", "AP"])
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    min_side: int = Field(64, ge=1)  # pixels; smaller images hold too little to read
    # Near-constant: the 1st-99th percentile range of [0, 1] pixels below this.
    min_dynamic_range: float = Field(0.02, ge=0.0, le=1.0)
    # Colour photographs: mean channel spread above this (grey films measure about 0.01).
    max_chroma: float = Field(0.06, ge=0.0, le=1.0)
    ood: bool = True  # refuse inputs the model's OOD reference places outside training
    # A patient outside the model's intended population (age from DICOM, else the model's own
    # population check): `refuse` it, or `flag`: score it, but with no positive/negative call
    # and no triage, and say why on the page, in the API and in the report.
    population: Literal["refuse", "flag"] = "refuse"


@dataclass(frozen=True)
class QCResult:
    code: str
    passed: bool
    message: str
    stage: str  # "intake" | "image" | "model"

    def as_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "passed": self.passed,
            "message": self.message,
            "stage": self.stage,
        }


class QCRefusal(Exception):
    """Raised by `check_intake` for an input refused from its header."""

    def __init__(self, result: QCResult) -> None:
        super().__init__(result.message)
        self.result = result

    @property
    def code(self) -> str:
        return self.result.code


def _ok(code: str, stage: str, message: str = "ok") -> QCResult:
    return QCResult(code, True, message, stage)


def _tag(tags: dict[str, object], name: str) -> str:
    value = tags.get(name)
    return str(value).strip().upper() if value not in (None, "") else ""


def check_tags(tags: dict[str, object], cfg: QCConfig) -> list[QCResult]:
    """Modality, body part and view from DICOM tags. Absent tags pass with a note."""
    out = []
    rules = (
        # (tag, allowed values, refusal code, result name, refusal message)
        (
            "Modality",
            cfg.modalities,
            MODALITY,
            "modality",
            "Modality {v} is not accepted: this service reads radiographs ({allowed}).",
        ),
        (
            "BodyPartExamined",
            cfg.body_parts,
            BODY_PART,
            "body_part",
            "Body part {v} is not a chest; the model reads chest radiographs only.",
        ),
        (
            "ViewPosition",
            cfg.views,
            VIEW,
            "view",
            "View {v} is not frontal; the model reads {slashed} views only.",
        ),
    )
    for tag, allowed, code, name, message in rules:
        value = _tag(tags, tag)
        if value and value not in allowed:
            msg = message.format(v=value, allowed=", ".join(allowed), slashed="/".join(allowed))
            out.append(QCResult(code, False, msg, "intake"))
        else:
            out.append(_ok(name, "intake", value or f"no {tag} tag"))
    return out


def check_intake(
    data: bytes, cfg: QCConfig, *, views: bool = True
) -> tuple[HeaderInfo, list[QCResult]]:
    """Header checks on uploaded bytes. Raises `QCRefusal` on the first failure. `views=False`
    lets a view the model does not read pass (an image of a study, refused per image when the
    study is scored), recorded as a failed result."""
    try:
        info = inspect_header(data, max_pixels=cfg.max_pixels)
    except ImageError as exc:
        raise QCRefusal(QCResult(exc.code, False, exc.message, "intake")) from None
    results = [_ok("format", "intake", info.format)]
    results += check_tags(info.dicom, cfg)
    for r in results:
        if not r.passed and (views or r.code != VIEW):
            raise QCRefusal(r)
    return info, results


def check_image(image: DecodedImage, cfg: QCConfig) -> list[QCResult]:
    """Checks on decoded pixels (H, W) in [0, 1]. Every check runs; callers refuse on any fail."""
    out = check_tags(image.dicom, cfg) if image.dicom else []
    h, w = image.shape
    if min(h, w) < cfg.min_side:
        msg = f"The image is {w}x{h} pixels; at least {cfg.min_side} on each side is needed."
        out.append(QCResult(TOO_SMALL, False, msg, "image"))
    else:
        out.append(_ok("size", "image", f"{w}x{h}"))
    px = image.pixels
    # A regular subsample of about 62,500 pixels is enough for the 1st and 99th percentiles:
    # the range stays within 0.02 (measured 0.013) of all pixels' on the real chests
    # (tests/test_reduced_decode.py), where their ranges are 0.3 to 0.9.
    step = max(1, int(np.ceil(np.sqrt(px.size / 62_500))))
    lo, hi = np.percentile(px[::step, ::step], [1, 99])
    if not np.isfinite(px).all():
        out.append(QCResult(CONSTANT, False, "The image holds invalid (NaN) pixels.", "image"))
    elif hi - lo < cfg.min_dynamic_range:
        msg = (
            "The image is blank or nearly uniform (almost no contrast): it holds no "
            "readable anatomy."
        )
        out.append(QCResult(CONSTANT, False, msg, "image"))
    else:
        out.append(_ok("contrast", "image", f"1-99% range {hi - lo:.2f}"))
    if image.chroma > cfg.max_chroma:
        msg = (
            f"The image is in colour (spread {image.chroma:.2f}): a radiograph is grey. "
            "Photographs are not accepted."
        )
        out.append(QCResult(COLOUR, False, msg, "image"))
    return out


def _array(b64: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4").astype(np.float64).reshape(shape)


def encode_array(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


class OODDetector:
    """Scores pooled features (B, C) against an `OODReference`: order 1 for training-like input."""

    def __init__(self, ref: OODReference) -> None:
        self.ref = ref
        k = len(ref.variances)
        self.mean = _array(ref.mean, (ref.dim,))
        self.components = _array(ref.components, (k, ref.dim))
        self.variances = np.asarray(ref.variances, dtype=np.float64)

    def score(self, embedding: np.ndarray) -> np.ndarray:
        """(B, C) -> (B,) Mahalanobis distance under the PPCA model, over sqrt(C)."""
        x = np.asarray(embedding, dtype=np.float64) - self.mean
        z = x @ self.components.T  # (B, k) coordinates on the principal directions
        residual = (x * x).sum(axis=1) - (z * z).sum(axis=1)  # squared norm off those directions
        d2 = (z * z / self.variances).sum(axis=1) + np.maximum(residual, 0.0) / (
            self.ref.residual_variance
        )
        return np.sqrt(d2 / self.ref.dim)

    def check(self, score: float) -> QCResult:
        t = self.ref.threshold
        if not np.isfinite(score) or score > t:
            msg = (
                f"The image does not look like the chest radiographs the model was trained on "
                f"(distance {score:.2f}, limit {t:.2f}). It may be another body part, a photo, "
                "or an unusual acquisition; it was not scored."
            )
            return QCResult(OOD, False, msg, "model")
        return _ok("distribution", "model", f"distance {score:.2f} (limit {t:.2f})")


def coarse_age(years: float) -> float:
    """The age kept with a result: whole months under 2 years, whole years above. Finer ages
    (days) with the study date would give away the birth date."""
    if years < 2:
        return round(int(years * 12 + 1e-9) / 12, 4)
    return float(int(years + 1e-9))


def age_words(years: float) -> str:
    """An age as a clinician writes it, in English: see `i18n.age_text`."""
    from diagnostics.serve.i18n import age_text

    return age_text("en", years)


def check_age(
    population: Population | None, age_years: float | None, source: str | None
) -> QCResult | None:
    """The age rule, when both the model states an age range and the file gives an age.
    None: the age cannot decide (no range, or no age known)."""
    if population is None or population.age_years is None or age_years is None:
        return None
    stated = f"{age_words(age_years)}, from {source}"
    if population.age_inside(age_years):
        return _ok("population", "population", f"age {stated}: inside {population.age_text()}")
    msg = (
        f"The patient's age ({stated}) is outside the ages the model was made for "
        f"({population.age_text()})."
    )
    return QCResult(OUTSIDE_POPULATION, False, msg, "population")


def check_population_score(
    population: Population, score: float, threshold: float | None = None
) -> QCResult:
    """The model's population check when no age is known: its logit against its threshold
    (or a site's own threshold, from a site profile)."""
    if population.check is None:
        raise ValueError("the model has no population check")
    limit = population.check.threshold if threshold is None else threshold
    if np.isfinite(score) and score >= limit:
        return _ok("population", "population", f"population check {score:.2f} (limit {limit:.2f})")
    msg = (
        f"No age was given, and the image does not look like a patient the model was made for "
        f"({population.age_text()}; {population.description or 'see the model card'}): "
        f"population check {score:.2f}, limit {limit:.2f}."
    )
    return QCResult(OUTSIDE_POPULATION, False, msg, "population")
