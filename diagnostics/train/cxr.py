"""`diagnostics train cxr`: train, calibrate, evaluate, export and track a CXR model.

The steps, each in its own module: data (`data.cxr`, `data.cache`, `data.augment`), network
(`models`), metrics and calibration (`train.metrics`, `train.calibrate`), export (`train.export`)
and MLflow (`train.tracking`). This file is the loop that ties them together: `train_cxr` is
a list of steps (load data, build the network, cache images, fit, calibrate, QC references,
export, int8, reports, log), each a function below that returns a small dataclass.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from diagnostics import __version__
from diagnostics.contract import (
    InputSpec,
    ModelMetadata,
    OODReference,
    Population,
    PreprocessSpec,
    Threshold,
    calibrated_probability,
)
from diagnostics.data.augment import CXRAugment
from diagnostics.data.cache import build_cache, from_uint16
from diagnostics.data.cxr import CXRTable, DatasetError, load_dataset
from diagnostics.imaging import load_for_model
from diagnostics.models.registry import create_model
from diagnostics.settings import get_settings
from diagnostics.train import tracking
from diagnostics.train.calibrate import choose_threshold, fit_temperature, sigmoid
from diagnostics.train.cards import cxr_model_card
from diagnostics.train.config import CXRTrainConfig, LoopConfig
from diagnostics.train.export import check_parity, export_onnx
from diagnostics.train.metrics import auroc, finding_report, mean_auroc
from diagnostics.train.plots import save_plots
from diagnostics.train.population import ImagePool, OutsideImages, load_outside

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    run_id: str | None
    onnx_path: Path
    sha256: str
    model_version: str | None
    findings: list[str]
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]] | None
    mean_val_auroc: float
    parity: float
    seconds: float
    epochs_run: int
    device: str
    precision: str
    metadata: ModelMetadata
    history: list[dict[str, float]] = field(default_factory=list)
    int8: dict[str, Any] | None = None
    timing: dict[str, float] = field(default_factory=dict)  # seconds per phase


class PhaseClock:
    """Seconds spent in each phase of a run: where the training time goes (metrics.json
    `timing_s`, MLflow `time.*`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lap = time.perf_counter()

    def lap(self, phase: str | None) -> None:
        """The time since the previous lap goes to `phase` (None: nowhere)."""
        now = time.perf_counter()
        if phase is not None:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._lap
        self._lap = now

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


# --------------------------------------------------------------------------- devices


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX-BF16 (Linux /proc/cpuinfo); elsewhere False, so fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def select_device(requested: str) -> torch.device:
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        log.warning("CUDA was requested but is not available: training on CPU")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """fp16 AMP on CUDA, bf16 on CPUs with bf16 units, else None (fp32)."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


# --------------------------------------------------------------------------- batches


def normalize_torch(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """(B, 1, S, S) in [0, 1] -> (B, C, S, S); the torch twin of `imaging.normalize`."""
    from diagnostics.contract import IMAGENET_MEAN, IMAGENET_STD

    x = x.expand(-1, spec.channels, -1, -1)
    if spec.normalize == "unit":
        return x.contiguous()
    mean, std = (
        (IMAGENET_MEAN, IMAGENET_STD) if spec.normalize == "imagenet" else (spec.mean, spec.std)
    )
    m = torch.tensor(np.broadcast_to(mean, (spec.channels,)), dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(np.broadcast_to(std, (spec.channels,)), dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def masked_bce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Binary cross-entropy over known labels only: NaN targets add nothing to loss or gradient.
    `smoothing` e moves targets to y(1 - e) + e/2."""
    known = ~torch.isnan(targets)
    y = torch.nan_to_num(targets, nan=0.0)
    if smoothing:
        y = y * (1 - smoothing) + 0.5 * smoothing
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, y, pos_weight=pos_weight, reduction="none"
    )
    return (loss * known).sum() / known.sum().clamp(min=1)


def val_log_loss(y: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary log loss (nats) of sigmoid(logits) over the known labels of (N, F) arrays."""
    known = ~np.isnan(y)
    z, t = logits[known], y[known]
    # log(1 + e^-z) for positives, log(1 + e^z) for negatives, computed stably
    return float(np.mean(np.logaddexp(0.0, -z) * t + np.logaddexp(0.0, z) * (1 - t)))


def _batch(
    cache: np.ndarray | ImagePool,
    idx: np.ndarray,
    spec: PreprocessSpec,
    augment: CXRAugment | None,
) -> torch.Tensor:
    x = torch.from_numpy(from_uint16(cache[idx]))[:, None]  # (B, 1, S, S) in [0, 1]
    if augment is not None:
        x = augment(x)
    return normalize_torch(x, spec)


def predict_outputs(
    model: torch.nn.Module,
    cache: np.ndarray | ImagePool,
    idx: np.ndarray,
    spec: PreprocessSpec,
    device: torch.device,
    batch_size: int,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (N, F) and population logits (N,) or None, float64, for cached images `idx`."""
    model.eval()
    out, pop = [], []
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            x = _batch(cache, idx[start : start + batch_size], spec, None).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits, population = model.forward_train(x)
            out.append(logits.float().cpu().numpy())
            if population is not None:
                pop.append(population.float().cpu().numpy())
    if not out:
        return np.zeros((0, 0)), None
    logits = np.concatenate(out).astype(np.float64)
    return logits, (np.concatenate(pop).astype(np.float64) if pop else None)


def predict_logits(
    model: torch.nn.Module,
    cache: np.ndarray | ImagePool,
    idx: np.ndarray,
    spec: PreprocessSpec,
    device: torch.device,
    batch_size: int,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """(N, F) float64 logits for cached images `idx`, in eval mode."""
    return predict_outputs(model, cache, idx, spec, device, batch_size, amp, channels_last)[0]


# --------------------------------------------------------------------------- run


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _run_dir(cfg: CXRTrainConfig, resume: str | Path | None) -> Path:
    runs = get_settings().runs_dir
    if resume in (None, ""):
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        return runs / f"{cfg.name}-{stamp}"
    if str(resume) == "last":
        pattern = re.compile(rf"^{re.escape(cfg.name)}-\d{{8}}-\d{{6}}$")  # not "name-other-..."
        candidates = sorted(
            p.parent.parent
            for p in runs.glob("*/checkpoints/last.pt")
            if pattern.match(p.parent.parent.name)
        )
        if not candidates:
            raise FileNotFoundError(f"no run of {cfg.name!r} to resume under {runs}")
        return candidates[-1]
    path = Path(resume)  # type: ignore[arg-type]
    if not (path / "checkpoints" / "last.pt").is_file():
        raise FileNotFoundError(f"{path} has no checkpoints/last.pt to resume from")
    return path


def _check_resumable(run_dir: Path, cfg: CXRTrainConfig) -> None:
    """Refuse to resume with other data, network, preprocessing, population check (the head
    is part of the network), weight averaging or selection rule; epochs may change."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    now = cfg.model_dump(mode="json")
    for key in ("data", "model", "preprocess", "population"):
        if saved.get(key) != now.get(key):
            raise ValueError(
                f"cannot resume {run_dir.name}: its '{key}' config differs from this one"
            )
    for key in ("ema_decay", "select"):
        was = saved.get("train", {}).get(key, LoopConfig.model_fields[key].default)
        if was != now["train"][key]:
            raise ValueError(
                f"cannot resume {run_dir.name}: its train.{key} ({was}) differs from this one"
            )


def _save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file: a crash mid-write never corrupts the resume point."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


# --------------------------------------------------------------------------- steps
#
# `train_cxr` is the list of steps below, in order. Each takes what it needs and returns a small
# dataclass. The tracker is MLflow, or does nothing when tracking is off (`tracking.make_tracker`).


@dataclass
class Runtime:
    """Where and how the arithmetic runs."""

    device: torch.device
    amp: torch.dtype | None  # autocast dtype; None = fp32
    precision: str  # "fp32", "fp16-amp" or "bf16-autocast"
    channels_last: bool
    np_rng: np.random.Generator  # the epochs' shuffles


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


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    pos_weight: torch.Tensor | None  # (F,) or None
    augment: CXRAugment | None
    ema: Any  # torch.optim.swa_utils.AveragedModel, or None
    steps: int  # optimiser steps per epoch


@dataclass
class LoopState:
    """Where training stands: at the start, or as a resume point (checkpoints/last.pt) left it."""

    start_epoch: int = 0
    best: float = -np.inf  # the best merit so far (higher is better)
    bad: int = 0  # epochs since the best
    run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False  # early-stopped: only the steps after the loop remain


@dataclass
class Fitted:
    epochs_run: int
    history: list[dict[str, float]]


@dataclass
class Calibration:
    temperatures: list[float]  # one per finding
    thresholds: dict[str, Threshold]
    val: dict[str, dict[str, float]]  # finding -> report
    test: dict[str, dict[str, float]] | None
    mean_val_auroc: float
    flat: dict[str, float]  # finite val metrics, "val.<finding>.<name>" and "val.mean_auroc"
    plots_dir: Path


@dataclass
class QCReferences:
    """What the clinic's input QC checks against: the OOD reference and the population."""

    ood: OODReference
    population: Population | None
    population_report: dict[str, Any] | None


@dataclass
class Exported:
    metadata: ModelMetadata
    onnx_path: Path
    sha256: str
    parity: float  # max |torch - ONNX Runtime| on the parity images
    inputs: np.ndarray  # (n, C, S, S) parity images, preprocessed as the clinic does


def train_cxr(
    cfg: CXRTrainConfig,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    log_to_mlflow: bool = True,
) -> TrainResult:
    """Train, calibrate, evaluate, export and (optionally) track. Returns what it measured."""
    t_start = time.perf_counter()
    clock = PhaseClock()
    run_dir = start_run_dir(cfg, resume)
    runtime = make_runtime(cfg.train)  # seeds first: the network's initial weights use them
    with clock("data"):
        data = load_data(cfg)
    model = build_model(cfg, data, runtime)  # before the cache: a bad name fails before hours
    images = cache_images(cfg, data, clock, progress)
    opt = make_optimisation(cfg, model, images, runtime)
    state = resume_state(run_dir, resume, model, opt, runtime)
    digest = tracking.dataset_digest(data.table.frame, data.findings)
    tracker = tracking.make_tracker(log_to_mlflow, cfg.tracking.experiment)
    with tracker.run(run_dir.name, state.run_id) as run_id:  # ends FAILED if anything raises
        if state.run_id is None:  # a fresh run; a resumed one logged these when it began
            log_setup(tracker, cfg, data, runtime, digest)
        state.run_id = run_id  # kept in the resume point: a resume continues this run
        fitted = fit(
            cfg, model, opt, data, images, runtime, state, run_dir, tracker, clock, progress
        )
        load_best(model, run_dir, runtime.device)
        clock.lap(None)
        model = as_exported(model, runtime.device)
        cal = calibrate(cfg, model, data, images, runtime.device, run_dir)
        clock.lap("calibrate")
        qc = qc_references(cfg, model, data, images)
        clock.lap("qc_references")  # the OOD reference and the population check
        metadata = model_metadata(cfg, data, cal, qc, run_id, digest)
        exported = export_model(cfg, model, metadata, data, run_dir)
        clock.lap("export")
        int8 = int8_variant(cfg, exported, data, images) if cfg.eval.int8 else None
        clock.lap("int8")
        write_reports(run_dir, data, cal, qc, exported, int8, clock, fitted.history)
        version = log_results(tracker, cfg, run_dir, cal, qc, exported, int8, clock)
        mark_finished(run_dir)  # a resume of this run would register the model twice
    return TrainResult(
        timing=clock.seconds,
        int8=int8,
        run_dir=run_dir,
        run_id=run_id,
        onnx_path=exported.onnx_path,
        sha256=exported.sha256,
        model_version=version,
        findings=data.findings,
        val=cal.val,
        test=cal.test,
        mean_val_auroc=cal.mean_val_auroc,
        parity=exported.parity,
        seconds=time.perf_counter() - t_start,
        epochs_run=fitted.epochs_run,
        device=runtime.device.type,
        precision=runtime.precision,
        metadata=metadata,
        history=fitted.history,
    )


def start_run_dir(cfg: CXRTrainConfig, resume: str | Path | None) -> Path:
    """The run's folder: new, with its config.yaml, or the one to resume (same config)."""
    run_dir = _run_dir(cfg, resume)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if resume in (None, ""):
        config_text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        (run_dir / "config.yaml").write_text(config_text)
    else:
        _check_resumable(run_dir, cfg)
    return run_dir


def make_runtime(loop: LoopConfig) -> Runtime:
    """Seed torch and numpy, set the threads, choose the device and precision."""
    torch.manual_seed(loop.seed)
    np_rng = np.random.default_rng(loop.seed)
    if loop.threads:
        torch.set_num_threads(loop.threads)
    device = select_device(loop.device)
    amp = autocast_dtype(device, loop.mixed_precision)
    precision = {None: "fp32", torch.float16: "fp16-amp", torch.bfloat16: "bf16-autocast"}[amp]
    return Runtime(device, amp, precision, loop.channels_last, np_rng)


def load_data(cfg: CXRTrainConfig) -> CXRData:
    """The dataset table with its splits and labels, and a population check's outside images."""
    table = load_dataset(cfg.data)
    check_cfg = cfg.population.check if cfg.population is not None else None
    outside = load_outside(check_cfg) if check_cfg is not None else None
    labels = table.labels().astype(np.float32)  # (N, F), NaN = unknown
    return CXRData(table, list(table.findings), _splits(table), labels, outside)


def build_model(cfg: CXRTrainConfig, data: CXRData, runtime: Runtime) -> torch.nn.Module:
    """The network from the registry, with a population head when there are outside images."""
    model = create_model(
        cfg.model.name,
        in_channels=cfg.preprocess.channels,
        num_classes=len(data.findings),
        pretrained=cfg.model.pretrained,
        weights_path=cfg.model.weights_path,
        dropout=cfg.model.dropout,
        **cfg.model.options,
    )
    if data.outside is not None:
        model.add_population_head()
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


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


def make_optimisation(
    cfg: CXRTrainConfig, model: torch.nn.Module, images: Images, runtime: Runtime
) -> Optimisation:
    """AdamW with warmup then cosine decay, the AMP scaler, class weights, augmentation, EMA."""
    loop = cfg.train
    steps = math.ceil(len(images.train_idx) / loop.batch_size)
    if loop.max_steps_per_epoch:
        steps = min(steps, loop.max_steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=loop.lr, weight_decay=loop.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(loop.epochs * steps, int(loop.warmup_epochs * steps))
    )
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp == torch.float16)
    pos_weight = None
    if loop.pos_weight == "balanced":
        y = images.labels[images.train_idx]
        pos = np.nansum(y, axis=0)
        neg = np.sum(~np.isnan(y), axis=0) - pos
        pos_weight = torch.tensor(
            np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), device=runtime.device
        )
    augment = (
        CXRAugment(**cfg.augment.model_dump(exclude={"enabled"})) if cfg.augment.enabled else None
    )
    ema = None
    if loop.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(loop.ema_decay), use_buffers=True
        )
    return Optimisation(optimizer, scheduler, scaler, pos_weight, augment, ema, steps)


def resume_state(
    run_dir: Path,
    resume: str | Path | None,
    model: torch.nn.Module,
    opt: Optimisation,
    runtime: Runtime,
) -> LoopState:
    """A fresh start, or the resume point loaded into the model, optimiser and RNGs."""
    last = run_dir / "checkpoints" / "last.pt"
    if resume in (None, "") or not last.is_file():
        return LoopState()
    # Load on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
    state = torch.load(last, map_location="cpu", weights_only=False)
    if state.get("finished"):
        raise ValueError(f"{run_dir.name} has finished; start a new run instead of resuming")
    model.load_state_dict(state["model"])
    if opt.ema is not None and state.get("ema") is not None:
        opt.ema.load_state_dict(state["ema"])
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the run began without fp16 AMP
        opt.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if runtime.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    runtime.np_rng.bit_generator.state = state["numpy_rng"]
    log.info("resuming %s after epoch %d", run_dir.name, state["epoch"] + 1)
    return LoopState(
        start_epoch=state["epoch"] + 1,
        best=state["best"],
        bad=state["bad"],
        run_id=state.get("run_id"),
        history=state.get("history", []),
        stopped=bool(state.get("stopped")),
    )


def log_setup(
    tracker: tracking.Tracker, cfg: CXRTrainConfig, data: CXRData, runtime: Runtime, digest: str
) -> None:
    """A new run's config, device and precision, standard tags and dataset input."""
    tracker.log_params(tracking.flatten(cfg.model_dump(mode="json")))
    tracker.log_params(
        {
            "device": runtime.device.type,
            "precision": runtime.precision,
            "findings": ",".join(data.findings),
        }
    )
    tracker.set_tags(tracking.standard_tags(f"{runtime.device.type}:{runtime.precision}"))
    frame = tracking.label_frame(data.table.frame, data.findings)
    tracker.log_dataset(frame, f"{cfg.name}:{cfg.data.source}", digest)


def fit(
    cfg: CXRTrainConfig,
    model: torch.nn.Module,
    opt: Optimisation,
    data: CXRData,
    images: Images,
    runtime: Runtime,
    state: LoopState,
    run_dir: Path,
    tracker: tracking.Tracker,
    clock: PhaseClock,
    progress: bool,
) -> Fitted:
    """The epoch loop: train, validate, log; keep the best weights (checkpoints/best.pt) and a
    resume point (checkpoints/last.pt) every epoch; stop early after `patience` epochs."""
    loop, ckpt_dir = cfg.train, run_dir / "checkpoints"
    judged = opt.ema.module if opt.ema is not None else model  # validated, kept and exported
    val = data.idx["val"]
    epochs_run = state.start_epoch
    for epoch in range(state.start_epoch, state.start_epoch if state.stopped else loop.epochs):
        epochs_run = epoch + 1
        t0 = time.perf_counter()
        losses, seen = train_epoch(cfg, model, opt, images, runtime, epoch, progress)
        speed = seen / max(time.perf_counter() - t0, 1e-9)
        clock.seconds["train"] = clock.seconds.get("train", 0.0) + time.perf_counter() - t0
        with clock("validate"):
            val_logits = predict_logits(
                judged,
                images.cache,
                val,
                cfg.preprocess,
                runtime.device,
                loop.batch_size * 2,
                runtime.amp,
                runtime.channels_last,
            )
        y_val = images.labels[val]
        val_auc = mean_auroc(y_val, sigmoid(val_logits))
        row = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "val_mean_auroc": val_auc,
            "val_loss": val_log_loss(y_val, val_logits),
            "images_per_s": speed,
            "lr": opt.scheduler.get_last_lr()[0],
        }
        for i, f in enumerate(data.findings):
            row[f"val_auroc_{f}"] = auroc(y_val[:, i], val_logits[:, i])
        state.history.append(row)
        log.info(
            "epoch %d: loss %.4f, val mean AUROC %.4f, %.1f img/s",
            epoch + 1,
            row["train_loss"],
            val_auc,
            speed,
        )
        tracker.log_metrics(
            {k: v for k, v in row.items() if k != "epoch" and np.isfinite(v)}, step=epoch + 1
        )
        # higher is better: AUROC, minus the loss, or the epoch itself ("last")
        merit = {"val_auroc": val_auc, "val_loss": -row["val_loss"], "last": epoch}[loop.select]
        if (np.isfinite(merit) and merit > state.best) or not np.isfinite(state.best):
            state.best, state.bad = (merit if np.isfinite(merit) else state.best), 0
            _save(judged.state_dict(), ckpt_dir / "best.pt")
        else:
            state.bad += 1
        state.stopped = state.bad >= loop.patience
        save_resume_point(ckpt_dir / "last.pt", model, opt, runtime, state, epoch)
        if state.stopped:
            log.info("early stop: no better %s for %d epochs", loop.select, state.bad)
            break
    return Fitted(epochs_run, state.history)


def train_epoch(
    cfg: CXRTrainConfig,
    model: torch.nn.Module,
    opt: Optimisation,
    images: Images,
    runtime: Runtime,
    epoch: int,
    progress: bool,
) -> tuple[list[float], int]:
    """One pass over a shuffle of the training images: the batch losses and images seen."""
    loop, spec, device, amp = cfg.train, cfg.preprocess, runtime.device, runtime.amp
    check_cfg = cfg.population.check if cfg.population is not None else None
    model.train()
    order = runtime.np_rng.permutation(images.train_idx)
    losses: list[float] = []
    seen = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=opt.steps * loop.batch_size,
            desc=f"epoch {epoch + 1}/{loop.epochs}",
            unit="img",
            leave=False,
            disable=None,
        )
    for step in range(opt.steps):
        batch_idx = order[step * loop.batch_size : (step + 1) * loop.batch_size]
        if len(batch_idx) == 0:
            break
        x = _batch(images.cache, batch_idx, spec, opt.augment).to(device)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(images.labels[batch_idx]).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits, population = model.forward_train(x)
        loss = masked_bce(logits.float(), y, opt.pos_weight, loop.label_smoothing)
        if population is not None:  # inside (1) or outside (0) the population
            target = torch.from_numpy(images.inside[batch_idx]).to(device)
            loss = loss + check_cfg.weight * (  # type: ignore[union-attr]
                torch.nn.functional.binary_cross_entropy_with_logits(population.float(), target)
            )
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        if loop.grad_clip:
            opt.scaler.unscale_(opt.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
        if opt.ema is not None:
            opt.ema.update_parameters(model)
        losses.append(loss.item())
        seen += len(batch_idx)
        if bar is not None:
            bar.update(len(batch_idx))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    if bar is not None:
        bar.close()
    return losses, seen


def save_resume_point(
    path: Path,
    model: torch.nn.Module,
    opt: Optimisation,
    runtime: Runtime,
    state: LoopState,
    epoch: int,
) -> None:
    """Everything a resume needs to continue after `epoch` as if never stopped."""
    _save(
        {
            "model": model.state_dict(),
            "ema": opt.ema.state_dict() if opt.ema is not None else None,
            "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(),
            "scaler": opt.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": runtime.np_rng.bit_generator.state,
            "epoch": epoch,
            "best": state.best,
            "bad": state.bad,
            "run_id": state.run_id,
            "history": state.history,
            "stopped": state.stopped,
            "cuda_rng": (torch.cuda.get_rng_state_all() if runtime.device.type == "cuda" else None),
        },
        path,
    )


def load_best(model: torch.nn.Module, run_dir: Path, device: torch.device) -> None:
    """The best epoch's weights (of the averaged model, with EMA) into `model`."""
    best = torch.load(run_dir / "checkpoints" / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(best)


def mark_finished(run_dir: Path) -> None:
    """Mark the resume point finished: resuming a finished run is refused."""
    last = run_dir / "checkpoints" / "last.pt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    state["finished"] = True
    _save(state, last)


def as_exported(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """fp32, contiguous, and on CUDA without TF32: the arithmetic ONNX Runtime will do."""
    model = model.float().to(memory_format=torch.contiguous_format)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return model


def calibrate(
    cfg: CXRTrainConfig,
    model: torch.nn.Module,
    data: CXRData,
    images: Images,
    device: torch.device,
    run_dir: Path,
) -> Calibration:
    """A temperature and an operating threshold per finding, chosen on val; val and test
    reports (calibrated probabilities), and their plots under run_dir/plots."""
    spec, ev, findings, idx = cfg.preprocess, cfg.eval, data.findings, data.idx
    bs = cfg.train.batch_size * 2
    val_logits = predict_logits(model, images.cache, idx["val"], spec, device, bs)  # fp32
    y_val = images.labels[idx["val"]]
    temps = [
        fit_temperature(val_logits[:, i], y_val[:, i]) if ev.calibrate else 1.0
        for i in range(len(findings))
    ]
    p_val = calibrated_probability(val_logits, temps)
    thresholds: dict[str, Threshold] = {}
    val_report: dict[str, dict[str, float]] = {}
    for i, f in enumerate(findings):
        t = choose_threshold(y_val[:, i], p_val[:, i], ev.threshold_policy)
        val_report[f] = finding_report(
            y_val[:, i], p_val[:, i], t, n_boot=ev.bootstrap, ece_bins=ev.ece_bins
        )
        val_report[f]["temperature"] = temps[i]
        thresholds[f] = Threshold(
            value=t,
            policy=ev.threshold_policy,
            sensitivity=_finite(val_report[f]["sensitivity"]),
            specificity=_finite(val_report[f]["specificity"]),
        )
    test_report = None
    plots_dir = run_dir / "plots"
    for i, f in enumerate(findings):
        save_plots(y_val[:, i], p_val[:, i], f"val_{f}", plots_dir, ev.ece_bins)
    if "test" in idx and len(idx["test"]):
        p_test = calibrated_probability(
            predict_logits(model, images.cache, idx["test"], spec, device, bs), temps
        )
        y_test = images.labels[idx["test"]]
        test_report = {
            f: finding_report(
                y_test[:, i],
                p_test[:, i],
                thresholds[f].value,
                n_boot=ev.bootstrap,
                ece_bins=ev.ece_bins,
            )
            for i, f in enumerate(findings)
        }
        for i, f in enumerate(findings):
            save_plots(y_test[:, i], p_test[:, i], f"test_{f}", plots_dir, ev.ece_bins)

    finite = [r["auroc"] for r in val_report.values() if np.isfinite(r["auroc"])]
    mean_val = float(np.mean(finite)) if finite else float("nan")
    flat = _flat("val", val_report)
    if np.isfinite(mean_val):  # metadata holds finite numbers only
        flat["val.mean_auroc"] = mean_val
    return Calibration(temps, thresholds, val_report, test_report, mean_val, flat, plots_dir)


def qc_references(
    cfg: CXRTrainConfig, model: torch.nn.Module, data: CXRData, images: Images
) -> QCReferences:
    """The OOD reference, and the intended population with its check (if configured)."""
    bs = cfg.train.batch_size * 2
    ood = _ood_reference(cfg, model, images.cache, data.idx, bs)
    population, report = _population(cfg, model, images.cache, data.idx, bs, data.outside, ood)
    return QCReferences(ood, population, report)


def model_metadata(
    cfg: CXRTrainConfig,
    data: CXRData,
    cal: Calibration,
    qc: QCReferences,
    run_id: str | None,
    digest: str,
) -> ModelMetadata:
    """What the ONNX file says about itself (the clinic needs nothing else)."""
    spec = cfg.preprocess
    return ModelMetadata(
        task="cxr",
        name=cfg.tracking.registered_model or cfg.name,
        architecture=cfg.model.name,
        labels=data.findings,
        temperature=cal.temperatures,
        thresholds=cal.thresholds,
        preprocessing=spec,
        input=InputSpec(shape=["batch", spec.channels, spec.size, spec.size]),
        run_id=run_id,
        dataset_digest=digest,
        dataset_name=f"{cfg.name}:{cfg.data.source}",
        metrics=cal.flat,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        package_version=__version__,
        intended_use=cfg.intended_use,
        limitations=cfg.limitations,
        ood=qc.ood,
        population=qc.population,
    )


def export_model(
    cfg: CXRTrainConfig,
    model: torch.nn.Module,
    metadata: ModelMetadata,
    data: CXRData,
    run_dir: Path,
) -> Exported:
    """run_dir/model.onnx, checked against torch on real validation images."""
    from diagnostics.contract import file_sha256

    onnx_path = export_onnx(model.cpu(), metadata, run_dir / "model.onnx")
    # Parity on real images, through the exact numpy preprocessing the clinic uses.
    paths = data.table.frame["path"].to_numpy()[data.idx["val"][: cfg.eval.parity_images]]
    inputs = np.stack([load_for_model(p, cfg.preprocess) for p in paths])
    parity = check_parity(model, onnx_path, inputs)
    return Exported(metadata, onnx_path, file_sha256(onnx_path), parity, inputs)


def write_reports(
    run_dir: Path,
    data: CXRData,
    cal: Calibration,
    qc: QCReferences,
    exported: Exported,
    int8: dict[str, Any] | None,
    clock: PhaseClock,
    history: list[dict[str, float]],
) -> None:
    """run_dir/metrics.json and run_dir/model_card.md."""
    metrics_doc = {
        "findings": data.findings,
        "val": cal.val,
        "test": cal.test,
        "mean_val_auroc": cal.mean_val_auroc,
        "onnx_parity_max_abs_diff": exported.parity,
        "sha256": exported.sha256,
        "int8": int8,
        "population": qc.population_report,
        "timing_s": {k: round(v, 1) for k, v in clock.seconds.items()},  # mlflow logging: after
        "history": history,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics_doc, indent=2, default=float))
    (run_dir / "model_card.md").write_text(
        cxr_model_card(exported.metadata, cal.val, cal.test, data.table, exported.sha256)
    )


def log_results(
    tracker: tracking.Tracker,
    cfg: CXRTrainConfig,
    run_dir: Path,
    cal: Calibration,
    qc: QCReferences,
    exported: Exported,
    int8: dict[str, Any] | None,
    clock: PhaseClock,
) -> str | None:
    """Metrics, tags, files and plots; log the ONNX model and register it if configured.
    Returns the registered version."""
    tracker.log_metrics(cal.flat)
    tracker.log_metrics({"onnx_parity_max_abs_diff": exported.parity})
    if cal.test:
        tracker.log_metrics(_flat("test", cal.test))
    tracker.set_tags({"onnx_sha256": exported.sha256})
    population = qc.population_report
    if population is not None:
        tracker.log_metrics(
            {
                f"population.{k}": float(v)
                for k, v in population["metrics"].items()
                if np.isfinite(v)
            }
        )
        tracker.log_metrics({"population.threshold": population["threshold"]})
        tracker.set_tags({"population.rule": population["rule"][:5000]})
    if int8 is not None:
        tracker.log_metrics({f"int8.{k}": v for k, v in int8.items() if isinstance(v, float)})
        tracker.log_artifact(Path(int8["path"]), artifact_path="int8")
        tracker.set_tags({"onnx_int8_sha256": int8["sha256"]})
    for name in ("config.yaml", "metrics.json", "model_card.md"):
        tracker.log_artifact(run_dir / name)
    tracker.log_artifacts(cal.plots_dir, artifact_path="plots")
    version = tracker.log_onnx_model(
        exported.onnx_path, exported.inputs[:1], cfg.tracking.registered_model
    )
    clock.lap("mlflow" if tracker.enabled else None)  # an untracked run has no MLflow phase
    tracker.log_metrics({f"time.{k}_s": v for k, v in clock.seconds.items()})
    return version


def _flat(prefix: str, report: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"<prefix>.<finding>.<name>": value} for the finite values of a per-finding report."""
    return {
        f"{prefix}.{f}.{k}": float(v)
        for f, r in report.items()
        for k, v in r.items()
        if np.isfinite(v)
    }


def _ood_reference(
    cfg: CXRTrainConfig,
    model: Any,
    cache: np.ndarray,
    idx: dict[str, np.ndarray],
    batch_size: int,
) -> OODReference:
    """Fit the OOD reference on a sample of training images; set its threshold on val."""
    from diagnostics.train.ood import embeddings, fit_reference

    ev, spec = cfg.eval, cfg.preprocess
    rng = np.random.default_rng(cfg.train.seed + 1)
    n = min(ev.ood_images, len(idx["train"]))
    sample = np.sort(rng.choice(idx["train"], n, replace=False))

    def feats(ids: np.ndarray) -> np.ndarray:
        chunks = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
        return embeddings(model.cpu(), [_batch(cache, c, spec, None) for c in chunks])

    ref = fit_reference(
        feats(sample),
        feats(idx["val"]),
        components=ev.ood_components,
        quantile=ev.ood_quantile,
        margin=ev.ood_margin,
    )
    log.info(
        "OOD reference: %d training images, threshold %.2f (val median %.2f, max %.2f)",
        ref.fitted_on,
        ref.threshold,
        ref.validation_scores["median"],
        ref.validation_scores["max"],
    )
    return ref


def _population(
    cfg: CXRTrainConfig,
    model: Any,
    cache: np.ndarray | ImagePool,
    idx: dict[str, np.ndarray],
    batch_size: int,
    outside: OutsideImages | None,
    ood: OODReference,
) -> tuple[Population | None, dict[str, Any] | None]:
    """The intended population for the metadata, with its check: its threshold set on the
    validation images and the calibration outside images, and measured on the validation images
    and the report outside images (none of which it trained on). For the record, the OOD
    distance is measured on the same images."""
    from diagnostics.serve.qc import OODDetector
    from diagnostics.train.ood import embeddings
    from diagnostics.train.population import fit_check, population_metadata

    if cfg.population is None:
        return None, None
    check_cfg = cfg.population.check
    if check_cfg is None or outside is None:
        return population_metadata(cfg.population, None), None
    spec = cfg.preprocess
    cpu = torch.device("cpu")
    if not isinstance(cache, ImagePool):
        raise TypeError("the population check needs the pooled inside and outside images")
    first = int(cache.offsets[1])  # outside images come after the inside ones

    def logits(ids: np.ndarray) -> np.ndarray:
        _, z = predict_outputs(model.cpu(), cache, ids, spec, cpu, batch_size)
        if z is None:
            raise ValueError("the model has no population head")
        return z

    calibration = first + np.flatnonzero(outside.part == "calibrate")
    report = outside.part == "report"
    held = first + np.flatnonzero(report)
    check = fit_check(
        check_cfg, logits(idx["val"]), logits(calibration), logits(held), outside.groups[report]
    )
    # The OOD distance on the same images: what the population check is compared with.
    detector = OODDetector(ood)

    def distance(ids: np.ndarray) -> np.ndarray:
        chunks = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
        return detector.score(embeddings(model, [_batch(cache, c, spec, None) for c in chunks]))

    d_val, d_out = distance(idx["val"]), distance(held)
    ood_compare = {
        "auroc": auroc(np.r_[np.zeros(len(d_val)), np.ones(len(d_out))], np.r_[d_val, d_out]),
        "outside_refused": float((d_out > ood.threshold).mean()),
        "inside_val_refused": float((d_val > ood.threshold).mean()),
    }
    report = {
        "threshold": check.threshold,
        "rule": check.rule,
        "metrics": check.metrics,
        "ood_distance_on_same_images": ood_compare,
    }
    log.info(
        "population check: AUROC %.3f; refuses %.1f%% of held-out outside images and %.1f%% of "
        "validation images (the OOD distance alone: %.1f%% and %.1f%%)",
        check.metrics["auroc"],
        100 * check.metrics["outside_refused"],
        100 * check.metrics["inside_val_refused"],
        100 * ood_compare["outside_refused"],
        100 * ood_compare["inside_val_refused"],
    )
    return population_metadata(cfg.population, check), report


def int8_variant(
    cfg: CXRTrainConfig, exported: Exported, data: CXRData, images: Images
) -> dict[str, Any]:
    """Static int8 model (model.int8.onnx) calibrated on training images, checked against the
    fp32 one on validation."""
    from diagnostics.contract import file_sha256
    from diagnostics.imaging import normalize
    from diagnostics.serve.runner import OnnxModel
    from diagnostics.train.export import quantize_int8

    metadata, fp32_path = exported.metadata, exported.onnx_path
    cache, idx, labels = images.cache, data.idx, images.labels
    spec = cfg.preprocess
    rng = np.random.default_rng(cfg.train.seed)  # a sample of every class, not the first rows
    n = min(cfg.eval.int8_calibration_images, len(idx["train"]))
    calib_idx = np.sort(rng.choice(idx["train"], n, replace=False))
    calibration = normalize(from_uint16(cache[calib_idx]), spec)
    meta = metadata.model_copy(update={"quantization": "int8-static-qdq-per-channel"})
    path = quantize_int8(fp32_path, fp32_path.with_name("model.int8.onnx"), calibration, meta)
    fp32, q8 = OnnxModel(fp32_path), OnnxModel(path)
    p32, p8, z32, z8 = [], [], [], []
    val = idx["val"]
    for start in range(0, len(val), 32):
        x = normalize(from_uint16(cache[val[start : start + 32]]), spec)
        r32, r8 = fp32.predict(x), q8.predict(x)
        p32.append(r32.probabilities)
        p8.append(r8.probabilities)
        if r32.population is not None and r8.population is not None:
            z32.append(r32.population)
            z8.append(r8.population)
    a, b = np.concatenate(p32), np.concatenate(p8)
    y = labels[val]
    out: dict[str, Any] = {
        "path": str(path),
        "sha256": file_sha256(path),
        "max_prob_diff": float(np.abs(a - b).max()),
    }
    out["mean_prob_diff"] = float(np.abs(a - b).mean())
    for i, f in enumerate(metadata.labels):
        out[f"val.{f}.auroc"] = auroc(y[:, i], b[:, i])
        out[f"val.{f}.auroc_delta"] = out[f"val.{f}.auroc"] - auroc(y[:, i], a[:, i])
        thr = metadata.thresholds[f].value
        # validation images whose positive/negative call differs between fp32 and int8
        out[f"val.{f}.decision_flips"] = float(((a[:, i] >= thr) != (b[:, i] >= thr)).sum())
    check = metadata.population.check if metadata.population else None
    if check is not None and z32:  # the population check keeps its fp32 threshold
        c32, c8 = np.concatenate(z32) >= check.threshold, np.concatenate(z8) >= check.threshold
        out["val.population.decision_flips"] = float((c32 != c8).sum())
    return out


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
