"""The data step of CXR training: the labelled dataset with its splits, and the image cache.

`load_data` reads the dataset table (and a population check's outside images); `cache_images`
decodes and preprocesses every image once, the outside images pooled after the dataset's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diagnostics.data.cache import build_cache
from diagnostics.data.cxr import CXRTable, DatasetError, load_dataset
from diagnostics.settings import get_settings
from diagnostics.train.config import CXRTrainConfig
from diagnostics.train.population import ImagePool, OutsideImages, load_outside
from diagnostics.train.runtime import PhaseClock


@dataclass
class CXRData:
    """The labelled dataset, its splits, and the outside images of a population check."""

    table: CXRTable
    findings: list[str]
    idx: dict[str, np.ndarray]  # split name -> row indices
    labels: np.ndarray  # (N, F) float32, NaN = unknown
    outside: OutsideImages | None


@dataclass
class Images:
    """The preprocessed image cache, pooled with any outside images (which come after)."""

    cache: np.ndarray | ImagePool
    labels: np.ndarray  # (N + outside, F) float32: outside images have no finding labels (NaN)
    inside: np.ndarray  # (N + outside,) population target: 1 inside, 0 outside
    train_idx: np.ndarray  # what an epoch draws from: train rows and the outside `fit` images


def load_data(cfg: CXRTrainConfig) -> CXRData:
    """The dataset table with its splits and labels, and a population check's outside images."""
    table = load_dataset(cfg.data)
    check_cfg = cfg.population.check if cfg.population is not None else None
    outside = load_outside(check_cfg) if check_cfg is not None else None
    labels = table.labels().astype(np.float32)  # (N, F), NaN = unknown
    return CXRData(table, list(table.findings), _splits(table), labels, outside)


def _splits(table: CXRTable) -> dict[str, np.ndarray]:
    split = table.frame["split"].to_numpy()
    out = {name: np.flatnonzero(split == name) for name in np.unique(split)}
    for needed in ("train", "val"):
        if needed not in out or len(out[needed]) == 0:
            raise DatasetError(
                f"training needs a '{needed}' split; this config gives {sorted(out)}. "
                "Set data.split.fractions with train and val."
            )
    return out


def cache_images(cfg: CXRTrainConfig, data: CXRData, clock: PhaseClock, progress: bool) -> Images:
    """Decode and preprocess every image once (cached on disk), outside images after the rest."""
    settings = get_settings()
    spec = cfg.preprocess
    with clock("cache"):
        cache: np.ndarray | ImagePool = build_cache(
            data.table.frame["path"].tolist(), spec, settings.cache_dir, progress=progress
        )
    n_inside = len(cache)
    labels, outside = data.labels, data.outside
    # Population target per pooled image: 1 for the dataset's (inside), 0 for outside images.
    inside = np.ones(n_inside, dtype=np.float32)
    train_idx = data.idx["train"]
    if outside is not None:
        with clock("cache"):
            outside_cache = build_cache(outside.paths, spec, settings.cache_dir, progress=progress)
        cache = ImagePool(cache, outside_cache)
        n_out, n_findings = len(outside.paths), len(data.findings)
        labels = np.vstack([labels, np.full((n_out, n_findings), np.nan, "f4")])
        inside = np.r_[inside, np.zeros(n_out, dtype=np.float32)]
        train_idx = np.r_[train_idx, n_inside + np.flatnonzero(outside.fit)]
    return Images(cache, labels, inside, train_idx)
