"""The intended population at training time: images from outside it, and the measured check.

A paediatric model must not score adults: its calls on them can be inverted. The population head
(`models.cxr.CAMClassifier.add_population_head`) is trained beside the findings, with the
dataset's training images as "inside" and a part of a set of outside images (adult chests) as
"outside" (outlier exposure, Hendrycks et al. 2019). The rest of the outside images is held out;
the check is measured on them and on the validation split, which it never trained on.

The threshold follows a stated rule: refuse at most `max_inside_refused` of the validation
images. What that costs in adults let through is measured on the held-out outside images and
reported, never tuned on them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from diagnostics.contract import Population, PopulationCheck
from diagnostics.data.cxr import DatasetError
from diagnostics.train.config import PopulationCheckConfig, PopulationConfig
from diagnostics.train.metrics import auroc


@dataclass
class OutsideImages:
    """Outside-population images: paths, a group per image, and the fit/held-out split."""

    paths: list[str]
    groups: np.ndarray  # (M,) str
    fit: np.ndarray  # (M,) bool: trains the head; the others are held out


def load_outside(cfg: PopulationCheckConfig) -> OutsideImages:
    """Read the outside-image CSV; split it by a hash of each path (stable across runs)."""
    spec = cfg.outside
    if not Path(spec.labels_file).is_file():
        raise DatasetError(f"population.check.outside: {spec.labels_file} not found")
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
    # A hash of the relative path, not a random draw: the same images are held out every run.
    fraction = np.array(
        [
            int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            for p in frame[spec.path_column]
        ]
    )
    fit = fraction < cfg.fit_fraction
    if fit.all() or not fit.any():
        raise DatasetError("population.check: too few outside images to both fit and hold out")
    return OutsideImages(paths=paths, groups=groups, fit=fit)


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
    outside_held: np.ndarray,
    outside_groups: np.ndarray,
) -> PopulationCheck:
    """Threshold by the rule, and the check measured on images it never trained on.

    `inside_val` (N,) are population logits of validation images (all inside), `outside_held`
    (M,) those of held-out outside images. An image is inside when its logit >= threshold.
    """
    q = cfg.max_inside_refused
    threshold = float(np.quantile(inside_val, q, method="lower"))  # refuses <= q exactly
    metrics = {
        "auroc": auroc(
            np.r_[np.ones(len(inside_val)), np.zeros(len(outside_held))],
            np.r_[inside_val, outside_held],
        ),
        "inside_val_refused": float((inside_val < threshold).mean()),
        "outside_refused": float((outside_held < threshold).mean()),
        "inside_val_images": float(len(inside_val)),
        "outside_held_images": float(len(outside_held)),
    }
    for group in np.unique(outside_groups):
        sel = outside_groups == group
        metrics[f"outside_refused.{group}"] = float((outside_held[sel] < threshold).mean())
    rule = (
        f"threshold = the {q:.1%} quantile of the validation images' population logits: it "
        f"refuses at most {q:.1%} of validation images (all inside the population)"
    )
    return PopulationCheck(threshold=threshold, rule=rule, metrics=metrics)
