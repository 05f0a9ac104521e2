"""The intended population at training time: images from outside it, and the measured check.

A paediatric model must not score adults: its calls on them can be inverted. The population head
(`models.cxr.CAMClassifier.add_population_head`) is trained beside the findings, with the
dataset's training images as "inside" and a part of a set of outside images (adult chests) as
"outside" (outlier exposure, Hendrycks et al. 2019). The other outside images are split, by a
hash of their paths, into a calibration part and a report part; the head never trains on them.

The threshold follows a stated rule: as lenient to inside images as the calibration outside
images allow, still refusing `min_outside_refused` of them (children from other hospitals look
less like the training centre's than its own do, so leniency spares them), and never refusing
more than `max_inside_refused` of the validation images. The check is then measured on the
report part and on the validation split, which set nothing.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from diagnostics.contract import Population, PopulationCheck
from diagnostics.data.cxr import DatasetError
from diagnostics.train.config import PopulationCheckConfig, PopulationConfig
from diagnostics.train.metrics import auroc

MAX_GROUPS = 20


@dataclass
class OutsideImages:
    """Outside-population images: paths, a group per image, and which part each is in."""

    paths: list[str]
    groups: np.ndarray  # (M,) str
    part: np.ndarray  # (M,) str: "fit" (trains the head), "calibrate" (sets the threshold),
    # "report" (measures the check)

    @property
    def fit(self) -> np.ndarray:
        return self.part == "fit"


def load_outside(cfg: PopulationCheckConfig) -> OutsideImages:
    """Read the outside-image CSV; split it by a hash of each path (stable across runs)."""
    spec = cfg.outside
    if not Path(spec.labels_file).is_file():
        raise DatasetError(
            f"population.check.outside: {spec.labels_file} not found: the images from outside "
            "the population that the check trains against (`diagnostics demo` writes the "
            "demo's; --set population.check=null trains without a check)"
        )
    frame = pd.read_csv(spec.labels_file, dtype=str, keep_default_na=False)
    for column in (spec.path_column, spec.group_column):
        if column is not None and column not in frame.columns:
            raise DatasetError(f"{spec.labels_file} has no column {column!r}")
    root = Path(spec.root) if spec.root is not None else Path(spec.labels_file).parent
    paths = [str(root / p) for p in frame[spec.path_column]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(paths)} outside-population images are not under {root}"
        )
    groups = (
        frame[spec.group_column].to_numpy(dtype=str)
        if spec.group_column
        else np.full(len(paths), "outside")
    )
    if len(set(groups)) > MAX_GROUPS:
        raise DatasetError(
            f"population.check.outside.group_column {spec.group_column!r} has "
            f"{len(set(groups))} values; it should name a few groups (at most {MAX_GROUPS}), "
            "never a patient or image key"
        )
    # group names become metric names: letters, digits and _ - . only
    groups = np.array([re.sub(r"[^A-Za-z0-9_.-]+", "_", g) or "_" for g in groups])
    # A hash of the relative path, not a random draw: the same images are held out every run.
    u = np.array(
        [
            int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            for p in frame[spec.path_column]
        ]
    )
    edges = (cfg.fit_fraction, cfg.fit_fraction + cfg.calibrate_fraction)
    part = np.where(u < edges[0], "fit", np.where(u < edges[1], "calibrate", "report"))
    counts = {k: int((part == k).sum()) for k in ("fit", "calibrate", "report")}
    if min(counts.values()) == 0:
        raise DatasetError(
            f"population.check: {len(paths)} outside images are too few to fit, calibrate and "
            f"report on ({counts})"
        )
    return OutsideImages(paths=paths, groups=groups, part=part)


class ImagePool:
    """Several image caches (N_i, S, S) read through one index: rows of the first, then of the
    second, and so on. Supports `pool[idx]` for an integer array, like the caches themselves."""

    def __init__(self, *caches: np.ndarray) -> None:
        self.caches = caches
        self.offsets = np.cumsum([0, *(len(c) for c in caches)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        first = self.caches[0]
        out = np.empty((len(idx), *first.shape[1:]), dtype=first.dtype)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for k, cache in enumerate(self.caches):
            rows = np.flatnonzero(which == k)
            if len(rows):
                # sorted reads from a memmap, then put back in the asked order
                local = idx[rows] - self.offsets[k]
                order = np.argsort(local, kind="stable")
                out[rows[order]] = cache[local[order]]
        return out


def population_metadata(cfg: PopulationConfig, check: PopulationCheck | None) -> Population:
    return Population(
        age_years=cfg.age_years,
        modalities=cfg.modalities,
        views=cfg.views,
        description=cfg.description,
        check=check,
    )


def fit_check(
    cfg: PopulationCheckConfig,
    inside_val: np.ndarray,
    outside_calibrate: np.ndarray,
    outside_report: np.ndarray,
    report_groups: np.ndarray,
) -> PopulationCheck:
    """Threshold by the rule; the check measured on images that set nothing.

    Population logits (an image is inside when its logit >= threshold): `inside_val` (N,) of
    validation images, all inside; `outside_calibrate` (M1,) of outside images that set the
    threshold; `outside_report` (M2,) of outside images it is measured on.
    """
    q, p = cfg.max_inside_refused, cfg.min_outside_refused
    # refuses at most q of validation images
    most = float(np.quantile(inside_val, q, method="lower"))
    # the lowest threshold that still refuses p of the calibration outside images
    least = float(np.nextafter(np.quantile(outside_calibrate, p, method="higher"), np.inf))
    threshold = min(most, least)
    metrics = {
        "auroc": auroc(
            np.r_[np.ones(len(inside_val)), np.zeros(len(outside_report))],
            np.r_[inside_val, outside_report],
        ),
        "inside_val_refused": float((inside_val < threshold).mean()),
        "outside_refused": float((outside_report < threshold).mean()),
        "outside_calibrate_refused": float((outside_calibrate < threshold).mean()),
        "inside_val_images": float(len(inside_val)),
        "outside_held_images": float(len(outside_report)),
        "outside_calibrate_images": float(len(outside_calibrate)),
    }
    for group in np.unique(report_groups):
        sel = report_groups == group
        metrics[f"outside_refused.{group}"] = float((outside_report[sel] < threshold).mean())
    which = "the outside bound" if least <= most else "the validation bound"
    rule = (
        f"the lower of: the lowest logit that refuses {p:.0%} of the calibration outside images "
        f"({least:.3f}), and the {q:.1%} quantile of the validation images' logits, which "
        f"refuses at most {q:.1%} of them ({most:.3f}); here {which}"
    )
    return PopulationCheck(
        threshold=threshold, rule=rule, max_inside_refused=q, outside_bound=least, metrics=metrics
    )
