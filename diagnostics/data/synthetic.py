"""Synthetic chest radiographs with known ground truth: the demo dataset and the base of fast tests.

Each image is drawn from simple anatomy (body outline, two lung fields, heart and mediastinum,
spine, ribs and clavicles, lung texture, noise). Five findings are drawn independently of each
other, each with a pixel mask, so that multi-label learning is real and heatmaps can be scored
against the lesion:

    Pneumonia     a consolidation-like opacity in one lung
    Effusion      fluid at a lung base with a meniscus
    Cardiomegaly  a heart wider than half the thorax
    Nodule        a small round opacity
    Pneumothorax  a lateral crescent without lung markings, bounded by a pleural line

Everything is deterministic in the seed: image i depends only on (seed, i). `difficulty` in [0, 1]
lowers lesion contrast and size and raises noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

SYNTH_FINDINGS = ("Pneumonia", "Effusion", "Cardiomegaly", "Nodule", "Pneumothorax")

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


@dataclass(frozen=True)
class SynthSpec:
    size: int = 128
    difficulty: float = 0.3
    prevalence: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SYNTH_FINDINGS, 0.3))

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError("size must be at least 32 pixels")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError("difficulty must be in [0, 1]")
        unknown = set(self.prevalence) - set(SYNTH_FINDINGS)
        if unknown:
            raise ValueError(f"unknown synthetic findings {sorted(unknown)}; use {SYNTH_FINDINGS}")


@dataclass
class SynthImage:
    pixels: np.ndarray  # (S, S) float32 in [0, 1], 0 = air
    labels: dict[str, int]
    masks: dict[str, np.ndarray]  # finding -> (S, S) bool, for positive findings only


@dataclass(frozen=True)
class _Anatomy:
    """Per-patient geometry, in units of the image side."""

    lung_dx: float  # lung centre offset from the midline
    lung_cy: float
    lung_rx: float
    lung_ry: float
    heart_r: float
    tilt: float


Habitus = Literal["standard", "broad"]


def _anatomy(rng: np.random.Generator, habitus: Habitus = "standard") -> _Anatomy:
    """Per-patient geometry. `broad`: wider, longer lungs and a smaller heart, a body the
    standard images never show; tests use it as a population outside the model's."""
    if habitus == "broad":
        return _Anatomy(
            lung_dx=rng.uniform(0.20, 0.22),
            lung_cy=rng.uniform(0.50, 0.53),
            lung_rx=rng.uniform(0.14, 0.16),
            lung_ry=rng.uniform(0.31, 0.34),
            heart_r=rng.uniform(0.075, 0.085),
            tilt=rng.uniform(-0.02, 0.02),
        )
    return _Anatomy(
        lung_dx=rng.uniform(0.15, 0.18),
        lung_cy=rng.uniform(0.44, 0.48),
        lung_rx=rng.uniform(0.11, 0.13),
        lung_ry=rng.uniform(0.25, 0.29),
        heart_r=rng.uniform(0.10, 0.115),
        tilt=rng.uniform(-0.02, 0.02),
    )


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=max(sigma, 0.1), mode="nearest")


def draw(
    rng: np.random.Generator, spec: SynthSpec, labels: dict[str, int], anatomy: _Anatomy
) -> SynthImage:
    """Draw one image with the given findings (1 = present)."""
    s = spec.size
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s  # (S, S) each, in [0, 1)
    d = spec.difficulty
    contrast = 0.24 - 0.16 * d  # lesion brightness over lung, display units
    a = anatomy

    img = np.full((s, s), 0.04, np.float32)  # air around the patient
    body = ((x - 0.5) / 0.44) ** 2 + ((y - 0.58) / 0.52) ** 2 < 1
    img[body] = 0.50
    centres = {"R": 0.5 - a.lung_dx, "L": 0.5 + a.lung_dx}  # patient's right is image left
    lungs = {
        side: ((x - cx) / a.lung_rx) ** 2 + ((y - a.lung_cy + a.tilt * (x - 0.5)) / a.lung_ry) ** 2
        < 1
        for side, cx in centres.items()
    }
    lung_any = lungs["R"] | lungs["L"]
    texture = _smooth(rng.normal(0, 1, (s, s)).astype(np.float32), s / 90) * 0.05
    img[lung_any] = 0.16 + texture[lung_any]

    # Ribs: curved bright bands over the lungs; clavicles at the top.
    ribs = np.zeros((s, s), np.float32)
    for k in range(9):
        y0 = 0.22 + k * 0.058
        for cx, sign in ((centres["R"], -1), (centres["L"], 1)):
            curve = y0 + 0.9 * (x - cx) ** 2 - 0.04 * sign * (x - cx)
            ribs += np.exp(-(((y - curve) / 0.008) ** 2)) * (np.abs(x - cx) < 0.17)
    clavicle = np.exp(-(((y - 0.17 - 0.25 * np.abs(x - 0.5)) / 0.012) ** 2)) * (
        np.abs(x - 0.5) < 0.3
    )
    img += 0.10 * np.clip(ribs, 0, 1) * body + 0.18 * clavicle * body

    masks: dict[str, np.ndarray] = {}
    heart_scale = 1.0
    if labels.get("Cardiomegaly"):
        heart_scale = rng.uniform(1.45, 1.65) - 0.15 * d  # cardiothoracic ratio above 0.5
    hr = a.heart_r * heart_scale
    heart = ((x - 0.54) / (hr * 1.15)) ** 2 + ((y - 0.63) / hr) ** 2 < 1
    mediastinum = (np.abs(x - 0.5) < 0.055) & (y > 0.15) & (y < 0.7)
    spine = (np.abs(x - 0.5) < 0.025) & body
    img[mediastinum | heart] = np.maximum(img[mediastinum | heart], 0.58)
    img[spine] = np.maximum(img[spine], 0.66)
    if labels.get("Cardiomegaly"):
        masks["Cardiomegaly"] = heart.copy()
    # Lung lesions are drawn only where the lung is not hidden behind the heart or mediastinum.
    lungs = {side: lung & ~(heart | mediastinum) for side, lung in lungs.items()}

    side_of = {f: ("R", "L")[int(rng.integers(0, 2))] for f in SYNTH_FINDINGS}

    if labels.get("Effusion"):
        lung = lungs[side_of["Effusion"]]
        cx = centres[side_of["Effusion"]]
        bottom = a.lung_cy + a.lung_ry
        level = bottom - a.lung_ry * rng.uniform(0.30, 0.45) * (1 - 0.4 * d)
        meniscus = level - 0.25 * np.abs(x - cx) ** 1.5 * 3  # fluid climbs laterally
        fluid = lung & (y > meniscus)
        img[fluid] = np.maximum(img[fluid], 0.16 + contrast * 1.8)
        masks["Effusion"] = fluid

    if labels.get("Pneumonia"):
        side = side_of["Pneumonia"]
        lung = lungs[side]
        cy = a.lung_cy + rng.uniform(-0.12, 0.15)
        cx = centres[side] + rng.uniform(-0.05, 0.05)
        r = rng.uniform(0.06, 0.09) * (1 - 0.3 * d)
        blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2)))
        blob *= 0.7 + 0.3 * _smooth(rng.random((s, s)).astype(np.float32), s / 40) * 2
        blob = np.clip(blob, 0, 1) * lung
        img += contrast * 1.3 * blob
        masks["Pneumonia"] = blob > 0.5

    if labels.get("Nodule"):
        side = side_of["Nodule"]
        lung = lungs[side]
        # Pick a point well inside the lung.
        inside = np.argwhere(_smooth(lung.astype(np.float32), s / 25) > 0.9)
        cy_i, cx_i = inside[rng.integers(0, len(inside))]
        r = rng.uniform(0.018, 0.03) * (1 - 0.3 * d)
        dist = np.sqrt((x - cx_i / s) ** 2 + (y - cy_i / s) ** 2)
        nodule = np.clip((r - dist) / (0.3 * r) + 0.5, 0, 1)
        img += contrast * 1.6 * nodule
        masks["Nodule"] = dist < r

    if labels.get("Pneumothorax"):
        side = side_of["Pneumothorax"]
        lung = lungs[side]
        sign = -1 if side == "R" else 1
        cx = centres[side]
        depth = rng.uniform(0.35, 0.55) * (1 - 0.3 * d)  # fraction of the lung half-width
        edge = cx + sign * a.lung_rx * (1 - depth)  # pleural line, curved along the apex
        edge_curve = edge - sign * 0.3 * (y - a.lung_cy) ** 2
        region = lung & (sign * (x - edge_curve) > 0) & (y < a.lung_cy + 0.6 * a.lung_ry)
        img[region] = 0.16 - contrast * 0.45  # no lung markings, darker
        line = lung & (np.abs(x - edge_curve) < 0.004) & (y < a.lung_cy + 0.6 * a.lung_ry)
        img[line] += contrast * 0.8
        masks["Pneumothorax"] = region

    img = _smooth(img, s / 400)
    noise = 0.008 + 0.03 * d
    img += rng.normal(0, noise, (s, s)).astype(np.float32)
    pixels = np.clip(img, 0, 1).astype(np.float32)
    return SynthImage(pixels=pixels, labels=dict(labels), masks=masks)


def generate(
    n: int, spec: SynthSpec, seed: int = 0, habitus: Habitus = "standard"
) -> list[tuple[str, SynthImage, dict[str, object]]]:
    """n images as (patient_id, image, demographics). Patients have 1-3 images each."""
    master = np.random.default_rng(seed)
    out = []
    i = 0
    p = 0
    while i < n:
        p += 1
        k = int(min(master.choice([1, 1, 2, 3]), n - i))
        patient = f"SYN{seed:03d}-{p:05d}"
        prng = np.random.default_rng([seed, 1_000_000 + p])
        anatomy = _anatomy(prng, habitus)
        demo = {"sex": ("F", "M")[int(prng.integers(0, 2))], "age": int(prng.integers(18, 90))}
        for _ in range(k):
            rng = np.random.default_rng([seed, i])
            labels = {f: int(rng.random() < spec.prevalence.get(f, 0.0)) for f in SYNTH_FINDINGS}
            out.append((patient, draw(rng, spec, labels, anatomy), demo))
            i += 1
    return out


def to_stored(pixels: np.ndarray, bits: int, photometric: str) -> np.ndarray:
    """Display values in [0, 1] -> stored DICOM values at `bits` (MONOCHROME1 inverted)."""
    top = 2**bits - 1
    stored = np.round(pixels.astype(np.float64) * top).astype(np.uint16)
    return (top - stored).astype(np.uint16) if photometric == "MONOCHROME1" else stored


def dicom_dataset(
    stored: np.ndarray,
    *,
    bits: int,
    photometric: str,
    uid_seed: str,
    modality: str = "CR",
    body_part: str = "CHEST",
    view: str = "PA",
    patient_id: str = "SYNTHETIC",
):
    """A single-frame CR dataset holding `stored` (H, W) uint16, explicit VR little endian."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_uid = generate_uid(entropy_srcs=[uid_seed, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view
    ds.PatientName = "SYNTHETIC^PATIENT"
    ds.PatientID = patient_id
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    ds.WindowCenter = 2 ** (bits - 1)  # full-range window: display = stored / (2**bits - 1)
    ds.WindowWidth = 2**bits
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def write_dataset(
    out: str | Path,
    n: int,
    *,
    size: int = 128,
    seed: int = 0,
    difficulty: float = 0.3,
    fmt: Literal["png", "dicom"] = "png",
    bits: int = 12,
    photometric: Literal["MONOCHROME1", "MONOCHROME2"] = "MONOCHROME2",
    prevalence: dict[str, float] | None = None,
    habitus: Habitus = "standard",
) -> Path:
    """Write images, masks and `manifest.csv` (the generic manifest format) under `out`."""
    from PIL import Image

    if bits not in (12, 16):
        raise ValueError("bits must be 12 or 16")
    out = Path(out)
    _remove_previous(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    spec = SynthSpec(
        size=size, difficulty=difficulty, prevalence=prevalence or SynthSpec().prevalence
    )
    rows = []
    for i, (patient, image, demo) in enumerate(generate(n, spec, seed, habitus)):
        stem = f"{i:06d}"
        if fmt == "png":
            rel = f"images/{stem}.png"
            Image.fromarray(np.round(image.pixels * 255).astype(np.uint8)).save(out / rel)
        else:
            rel = f"images/{stem}.dcm"
            stored = to_stored(image.pixels, bits, photometric)
            ds = dicom_dataset(
                stored,
                bits=bits,
                photometric=photometric,
                uid_seed=f"{seed}:{i}",
                patient_id=patient,
            )
            ds.PatientAge = f"{int(demo['age']):03d}Y"  # DICOM AS, as the manifest's age column
            ds.save_as(out / rel, enforce_file_format=True)
        row: dict[str, object] = {"path": rel, "patient_id": patient, "view": "PA", **demo}
        row.update(image.labels)
        for f in SYNTH_FINDINGS:
            if f in image.masks:
                mrel = f"masks/{stem}_{f}.png"
                Image.fromarray(image.masks[f].astype(np.uint8) * 255).save(out / mrel)
                row[f"mask_{f}"] = mrel
            else:
                row[f"mask_{f}"] = ""
        rows.append(row)
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    return out / "manifest.csv"


def _remove_previous(out: Path) -> None:
    """Delete the images and masks a previous run listed in out/manifest.csv (and nothing else)."""
    manifest = out / "manifest.csv"
    if not manifest.is_file():
        return
    old = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    columns = [c for c in old.columns if c == "path" or c.startswith("mask_")]
    for rel in old[columns].to_numpy().ravel():
        target = (out / rel).resolve() if rel else None
        if target is not None and target.is_file() and out.resolve() in target.parents:
            target.unlink()
    manifest.unlink()


def digest(path: str | Path) -> str:
    """sha256 of a file, for determinism checks."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
