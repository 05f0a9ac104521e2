"""The data step of CXR training: the labelled dataset with its splits, and the image cache.

`load_data` reads the dataset table (and a population check's outside images); `cache_images`
decodes and preprocesses every image once, the outside images pooled after the dataset's own.

Under torchrun (`train cxr --nproc N`) every machine keeps a whole cache (each rank's shards
change every epoch, and rank 0 calibrates on all of the validation split), and the processes of
a machine share the decoding: each decodes every local_world-th image into one file
(`_shared_cache`).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diagnostics.contract import PreprocessSpec
from diagnostics.data.cache import CacheBuildError, build_cache, cache_key, to_uint16
from diagnostics.data.cxr import CXRTable, DatasetError, load_dataset
from diagnostics.imaging import ImageError, decode, resize_square
from diagnostics.settings import get_settings
from diagnostics.train.config import CXRTrainConfig
from diagnostics.train.distributed import SINGLE, Dist, debug_record
from diagnostics.train.population import ImagePool, OutsideImages, load_outside
from diagnostics.train.runtime import PhaseClock

log = logging.getLogger(__name__)


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


def cache_images(
    cfg: CXRTrainConfig,
    data: CXRData,
    clock: PhaseClock,
    progress: bool,
    ctx: Dist = SINGLE,
) -> Images:
    """Decode and preprocess every image once (cached on disk), outside images after the rest."""
    settings = get_settings()
    spec = cfg.preprocess
    with clock("cache"):
        own = _cache(data.table.frame["path"].tolist(), spec, settings.cache_dir, progress, ctx)
    cache: np.ndarray | ImagePool = own
    n_inside = len(own)
    labels, outside = data.labels, data.outside
    # Population target per pooled image: 1 for the dataset's (inside), 0 for outside images.
    inside = np.ones(n_inside, dtype=np.float32)
    train_idx = data.idx["train"]
    if outside is not None:
        with clock("cache"):
            outside_cache = _cache(outside.paths, spec, settings.cache_dir, progress, ctx)
        cache = ImagePool(own, outside_cache)
        n_out, n_findings = len(outside.paths), len(data.findings)
        labels = np.vstack([labels, np.full((n_out, n_findings), np.nan, "f4")])
        inside = np.r_[inside, np.zeros(n_out, dtype=np.float32)]
        train_idx = np.r_[train_idx, n_inside + np.flatnonzero(outside.fit)]
    return Images(cache, labels, inside, train_idx)


def _cache(
    paths: Sequence[str], spec: PreprocessSpec, cache_dir: Path, progress: bool, ctx: Dist
) -> np.ndarray:
    if not ctx.sharded:
        return build_cache(paths, spec, cache_dir, progress=progress)
    return _shared_cache(paths, spec, cache_dir, progress, ctx)


def _shared_cache(
    paths: Sequence[str], spec: PreprocessSpec, cache_dir: Path, progress: bool, ctx: Dist
) -> np.ndarray:
    """`data.cache.build_cache`'s file, its decoding shared by the processes of each machine:
    local rank k decodes rows k, k + local_world, ... into one file, which local rank 0 then
    renames into place (atomically, as build_cache does). A cache every rank finds is reused.

    The file being written is named for this run (a token rank 0 draws and sends to every rank)
    and this machine: two runs on one machine with the same data write two files, and the
    second never truncates the first's while it writes through its map; whichever finishes
    last renames the same bytes into place."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"cxr-{cache_key(paths, spec)}-{spec.size}.npy"  # build_cache's name
    if ctx.all_true(target.is_file()):
        return build_cache(paths, spec, cache_dir, progress=False)  # a hit on every rank
    # One file per run and machine: machines that share a disk each build theirs, as do two
    # runs on one machine, and the renames agree (the same bytes).
    token = ctx.broadcast(uuid.uuid4().hex[:16])  # rank 0's, on every rank
    tmp = target.with_suffix(f".tmp-{token}-node{ctx.node_rank}.npy")
    shape = (len(paths), spec.size, spec.size)
    if ctx.local_rank == 0:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=shape).flush()
    ctx.barrier()
    try:
        _decode_into(tmp, target, paths, spec, progress, ctx)
    except BaseException:
        if ctx.local_rank == 0:  # a named file of this run only: nobody else writes it
            tmp.unlink(missing_ok=True)
        raise
    ctx.barrier()  # in place before anyone reads it
    return np.load(target, mmap_mode="r")


def _decode_into(
    tmp: Path,
    target: Path,
    paths: Sequence[str],
    spec: PreprocessSpec,
    progress: bool,
    ctx: Dist,
) -> None:
    """This process's rows of the machine's file `tmp`, then (local rank 0) `tmp` renamed to
    `target` once every row is written."""
    rows = np.arange(ctx.local_rank, len(paths), ctx.local_world)
    out = np.load(tmp, mmap_mode="r+")
    failures: list[tuple[int, str]] = []

    def work(i: int) -> None:
        try:
            out[i] = to_uint16(resize_square(decode(paths[i]).pixels, spec))
        except ImageError as exc:
            failures.append((int(i), exc.code))

    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="decode+cache (rank 0)", unit="img", leave=False)
    workers = max(1, (os.cpu_count() or 1) // ctx.local_world)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(work, rows):
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    out.flush()
    debug_record(ctx, {"event": "cache", "decoded": rows, "images": len(paths)})
    failed = sorted(f for part in ctx.all_gather(failures) for f in part)
    if failed:
        ctx.barrier()  # every rank done with the file; local rank 0 removes it on the way out
        where = ", ".join(f"row {i} ({code})" for i, code in failed[:10])
        raise CacheBuildError(f"{len(failed)} images could not be decoded: {where}")
    ctx.barrier()  # every row written
    if ctx.local_rank == 0:
        os.replace(tmp, target)
        log.info(
            "image cache built: %s (%d images, %d processes)",
            target.name,
            len(paths),
            ctx.local_world,
        )
