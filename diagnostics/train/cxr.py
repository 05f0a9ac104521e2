"""`diagnostics train cxr`: train, calibrate, evaluate, export and track a CXR model.

`train_cxr` is the list of steps, in order: each takes what it needs and returns a small
dataclass. The epoch loop (`fit`, `train_epoch`) is here; the other steps live in files named
for what they do:

    runtime.py        seeds, threads, device and precision; the phase clock
    distributed.py    several processes under torchrun: ranks, shards, gathered predictions
    cxr_data.py       the dataset with its splits and labels; the image cache
    optimisation.py   AdamW and its schedule, the AMP scaler, class weights, augmentation, EMA
    checkpoints.py    the run folder, resume points and the best weights
    batches.py        image batches, the masked loss, predictions over cached images
    calibrate.py      a temperature and an operating threshold per finding; val and test reports
    qc_references.py  the OOD reference and the population check that input QC uses
    export.py         the model metadata, ONNX export with its parity check, the int8 variant
    reports.py        metrics.json, model_card.md and the MLflow record

`train_cxr_distributed` is one rank of `train cxr --nproc N` (DDP under torchrun): the same
steps, every rank training on its shard of each global batch, rank 0 alone writing, tracking,
calibrating and exporting (see distributed.py).

The network comes from `models`, the metrics from `train.metrics`. The tracker is MLflow, or
does nothing when tracking is off (`tracking.make_tracker`). The `x as x` imports re-export
helpers that tests and benchmarks import from here, where they used to live.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diagnostics.contract import ModelMetadata
from diagnostics.models.registry import create_model
from diagnostics.train import distributed, tracking
from diagnostics.train.batches import image_batch, masked_bce, predict_logits, val_log_loss
from diagnostics.train.batches import normalize_torch as normalize_torch
from diagnostics.train.calibrate import calibrate, sigmoid
from diagnostics.train.checkpoints import (
    LoopState,
    atomic_save,
    load_best,
    mark_finished,
    resume_state,
    save_resume_point,
    start_run_dir,
)
from diagnostics.train.checkpoints import _check_resumable as _check_resumable
from diagnostics.train.checkpoints import _run_dir as _run_dir
from diagnostics.train.config import CXRTrainConfig
from diagnostics.train.cxr_data import CXRData, Images, cache_images, load_data
from diagnostics.train.distributed import SINGLE, Dist
from diagnostics.train.export import export_model, int8_variant, model_metadata
from diagnostics.train.metrics import auroc, mean_auroc
from diagnostics.train.optimisation import Optimisation, make_optimisation
from diagnostics.train.qc_references import qc_references
from diagnostics.train.reports import log_results, log_setup, write_reports
from diagnostics.train.runtime import PhaseClock, Runtime, as_exported, make_runtime
from diagnostics.train.runtime import autocast_dtype as autocast_dtype
from diagnostics.train.runtime import cpu_has_bf16 as cpu_has_bf16
from diagnostics.train.runtime import select_device as select_device

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
    processes: int = 1  # ranks that trained it (torchrun)


@dataclass
class Fitted:
    epochs_run: int
    history: list[dict[str, float]]


def train_cxr(
    cfg: CXRTrainConfig,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    log_to_mlflow: bool = True,
) -> TrainResult:
    """Train, calibrate, evaluate, export and (optionally) track. Returns what it measured."""
    result = _train(cfg, resume, progress, log_to_mlflow, SINGLE)
    assert result is not None  # one process is rank 0
    return result


def train_cxr_distributed(
    cfg: CXRTrainConfig,
    *,
    resume: str | Path | None = None,
    progress: bool = True,
    log_to_mlflow: bool = True,
) -> TrainResult | None:
    """One rank of `train cxr --nproc N`, started by torchrun: joins the process group, trains
    its shard of every global batch, and on rank 0 calibrates, exports and tracks. What rank 0
    measured, or None on the other ranks."""
    with distributed.process_group(cfg.train.device, cfg.train.batch_size) as ctx:
        return _train(cfg, resume, progress and ctx.is_main, log_to_mlflow and ctx.is_main, ctx)


def _train(
    cfg: CXRTrainConfig,
    resume: str | Path | None,
    progress: bool,
    log_to_mlflow: bool,
    ctx: Dist,
) -> TrainResult | None:
    t_start = time.perf_counter()
    clock = PhaseClock()
    run_dir = ctx.on_main(lambda: start_run_dir(cfg, resume))  # rank 0's folder; others read
    runtime = make_runtime(cfg.train, ctx)  # seeds first: the network's initial weights use them
    with clock("data"):
        data = load_data(cfg)
    model = build_model(cfg, data, runtime)  # before the cache: a bad name fails before hours
    model = distributed.prepare(model, runtime.device, ctx)  # SyncBatchNorm on CUDA ranks
    images = cache_images(cfg, data, clock, progress, ctx)
    opt = make_optimisation(cfg, model, images, runtime)
    state = resume_state(run_dir, resume, model, opt, runtime, ctx)
    if distributed.debug_enabled():  # the weights each rank built, before DDP copies rank 0's
        distributed.debug_record(
            ctx, {"event": "start", "params": distributed.param_checksum(model)}
        )
    step = distributed.wrap(model, runtime.device, ctx)  # DDP with several ranks
    digest = tracking.dataset_digest(data.table.frame, data.findings)
    tracker = tracking.make_tracker(log_to_mlflow, cfg.tracking.experiment)  # rank 0 only
    with tracker.run(run_dir.name, state.run_id) as run_id:  # ends FAILED if anything raises
        if state.run_id is None and ctx.is_main:  # a fresh run; a resumed one logged these
            log_setup(tracker, cfg, data, runtime, digest)
        if ctx.launched:  # tags, not params: a resume may use another number of processes
            tracker.set_tags(
                {
                    "ddp.processes": str(ctx.world),
                    "ddp.backend": str(ctx.backend),
                    "ddp.batch_per_process": str(cfg.train.batch_size // ctx.world),
                }
            )
        state.run_id = run_id  # kept in the resume point: a resume continues this run
        fitted = fit(
            cfg,
            model,
            opt,
            data,
            images,
            runtime,
            state,
            run_dir,
            tracker,
            clock,
            progress,
            ctx,
            step,
        )
        ctx.leave()  # no collectives after the loop: the ranks leave the group together
        if not ctx.is_main:
            return None  # rank 0 alone calibrates, exports and tracks
        if ctx.sharded:
            # The network as one process makes it (BatchNorm, not SyncBatchNorm), with every
            # CPU thread of the machine now that the other ranks are done.
            model = build_model(cfg, data, runtime)
            if runtime.device.type == "cpu":
                torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
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
        processes=ctx.world,
    )


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
    ctx: Dist = SINGLE,
    step: Callable[..., Any] | None = None,
) -> Fitted:
    """The epoch loop: train, validate, log; keep the best weights (checkpoints/best.pt) and a
    resume point (checkpoints/last.pt) every epoch; stop early after `patience` epochs.

    Under torchrun every rank runs it: `step` is the DDP-wrapped forward, each rank trains and
    validates its shard, and the losses and validation predictions are gathered so that every
    rank decides the same (best epoch, early stop); rank 0 alone writes the checkpoints."""
    loop, ckpt_dir = cfg.train, run_dir / "checkpoints"
    judged = opt.ema.module if opt.ema is not None else model  # validated, kept and exported
    val = data.idx["val"]
    epochs_run = state.start_epoch
    for epoch in range(state.start_epoch, state.start_epoch if state.stopped else loop.epochs):
        distributed.maybe_fail(ctx, epoch + 1)
        epochs_run = epoch + 1
        t0 = time.perf_counter()
        losses, seen, share = train_epoch(
            cfg, model, opt, images, runtime, epoch, progress, ctx, step
        )
        losses, seen = ctx.mean(losses), ctx.total(seen)  # every rank's step -> the global step
        speed = seen / max(time.perf_counter() - t0, 1e-9)
        clock.seconds["train"] = clock.seconds.get("train", 0.0) + time.perf_counter() - t0
        with clock("validate"):
            ctx.sync_buffers(judged)  # rank 0's BatchNorm statistics: one model to validate
            mine = ctx.shard(val)  # this rank's share (all of it in one process)
            val_logits = predict_logits(
                judged,
                images.cache,
                mine,
                cfg.preprocess,
                runtime.device,
                loop.batch_size * 2,
                runtime.amp,
                runtime.channels_last,
            )
            if ctx.sharded:  # every rank's share, each image once, in `val` order
                val_logits = ctx.gather(mine, val_logits, val)
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
            if ctx.is_main:
                atomic_save(judged.state_dict(), ckpt_dir / "best.pt")
        else:
            state.bad += 1
        state.stopped = state.bad >= loop.patience
        if ctx.is_main:
            save_resume_point(ckpt_dir / "last.pt", model, opt, runtime, state, epoch, ctx.world)
        if distributed.debug_enabled():
            distributed.debug_record(
                ctx,
                {
                    "epoch": epoch + 1,
                    "train_share": share,
                    "seen": seen,
                    "val_rows": mine,
                    "step_losses": losses,
                    "val_loss": row["val_loss"],
                    "params": distributed.param_checksum(model),
                },
            )
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
    ctx: Dist = SINGLE,
    step: Callable[..., Any] | None = None,
) -> tuple[list[float], int, np.ndarray]:
    """One pass over a shuffle of the training images: the batch losses, the images seen and
    the epoch's order (this rank's share of it, padded as DistributedSampler pads).

    The shuffle is drawn from the run's numpy stream, the same on every rank; under torchrun
    each rank takes its share (DistributedSampler) and batches of batch_size / W, so that step
    s of all ranks together is step s of one process. The sampler's padding (repeats in the
    last step) weighs nothing in the loss, and `seen` counts each image once."""
    loop, spec, device, amp = cfg.train, cfg.preprocess, runtime.device, runtime.amp
    check_cfg = cfg.population.check if cfg.population is not None else None
    forward = step if step is not None else model.forward_train
    model.train()
    order = runtime.np_rng.permutation(images.train_idx)
    batch_size = loop.batch_size
    repeats: np.ndarray | None = None  # this rank's padding (repeated images), when sharded
    if ctx.launched:
        # This rank's augmentation and dropout draws: its own, and the same on a resume.
        torch.manual_seed(distributed.epoch_seed(loop.seed, epoch, ctx.rank))
        if ctx.sharded:
            repeats = ctx.repeats(len(order))
        order = ctx.shard(order, epoch)
        batch_size = loop.batch_size // ctx.world
    losses: list[float] = []
    seen = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=opt.steps * batch_size,
            desc=f"epoch {epoch + 1}/{loop.epochs}",
            unit="img",
            leave=False,
            disable=None,
        )
    for i in range(opt.steps):
        batch_idx = order[i * batch_size : (i + 1) * batch_size]
        if len(batch_idx) == 0:
            break
        x = image_batch(images.cache, batch_idx, spec, opt.augment).to(device)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(images.labels[batch_idx]).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits, population = forward(x)
        target = None  # inside (1) or outside (0) the population, when there is a head
        if population is not None:
            population = population.float()
            target = torch.from_numpy(images.inside[batch_idx]).to(device)
        real = None if repeats is None else ~repeats[i * batch_size : (i + 1) * batch_size]
        loss = batch_loss(
            logits.float(),
            y,
            population,
            target,
            opt.pos_weight,
            loop.label_smoothing,
            check_cfg.weight if check_cfg is not None else 0.0,
            ctx,
            real,
        )
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()  # DDP: the gradients averaged over the ranks here
        if loop.grad_clip:
            opt.scaler.unscale_(opt.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
        if opt.ema is not None:
            opt.ema.update_parameters(model)
        losses.append(loss.item())  # several ranks: their mean is the global batch's loss
        seen += len(batch_idx) if real is None else int(real.sum())
        if bar is not None:
            bar.update(len(batch_idx))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    if bar is not None:
        bar.close()
    return losses, seen, order


def batch_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    population: torch.Tensor | None,
    inside: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    smoothing: float,
    population_weight: float,
    ctx: Dist = SINGLE,
    real: np.ndarray | None = None,
) -> torch.Tensor:
    """A step's loss: the masked BCE over the known labels (NaN: unknown), plus
    `population_weight` times the population head's BCE (inside 1, outside 0) when there is one.

    One process (or `--nproc 1`): `masked_bce`, the mean over the batch's known labels, plus the
    mean population BCE over its images. Several ranks: the same means over the global batch,
    not the mean of each rank's means, which would weigh the images of a rank with fewer known
    labels (partial labels; outside images, which have none) more. Each rank sums its own
    losses and `Dist.global_mean` divides by the global counts, so that DDP's averaging of the
    gradients gives those of the one-process loss. Rows where `real` is False (the sampler's
    repeats, in the last step of an epoch) weigh nothing."""
    if population is not None and inside is None:
        raise ValueError("a population head's logits need their inside/outside targets")
    if not ctx.sharded:
        loss = masked_bce(logits, y, pos_weight, smoothing)
        if population is not None and inside is not None:
            loss = loss + population_weight * (
                torch.nn.functional.binary_cross_entropy_with_logits(population, inside)
            )
        return loss
    keep = torch.ones(len(y), dtype=torch.bool, device=y.device)
    if real is not None:
        keep = torch.from_numpy(np.asarray(real, dtype=bool)).to(y.device)
    y = torch.where(keep[:, None], y, torch.full_like(y, float("nan")))  # repeats: unknown
    known = (~torch.isnan(y)).sum().to(logits.dtype)
    # masked_bce is the sum over the known labels divided by their count (1 when none, and the
    # sum is then 0): times the count, it is the sum.
    label_sum = masked_bce(logits, y, pos_weight, smoothing) * known
    rows = keep.sum().to(logits.dtype)
    if population is None or inside is None:
        return ctx.global_mean(label_sum[None], known[None])[0]
    per_row = torch.nn.functional.binary_cross_entropy_with_logits(
        population, inside, reduction="none"
    )
    population_sum = (per_row * keep).sum()
    means = ctx.global_mean(torch.stack([label_sum, population_sum]), torch.stack([known, rows]))
    return means[0] + population_weight * means[1]
