"""The run folder and its resume points.

A run lives in runs/<name>-<UTC stamp>/ beside its config.yaml. Every epoch leaves
checkpoints/last.pt, all a resume needs to continue as if never stopped (weights, EMA, optimiser,
scheduler, scaler, RNG states, the MLflow run), and the best epoch's weights in
checkpoints/best.pt. A resume keeps the data, network, preprocessing, population check, weight
averaging and selection rule; a finished run is never resumed.

A resume point holds no sampler state: the weights are the unwrapped network's (no DDP
prefix), and progress is the epoch and the numpy stream that draws each epoch's order, the
same for any number of processes. So a run written by `--nproc 2` resumes with one process,
and the reverse. Under torchrun, rank 0 alone writes the folder and reads the resume point,
and sends it to the other ranks.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from diagnostics.settings import get_settings
from diagnostics.train.config import CXRTrainConfig, LoopConfig
from diagnostics.train.distributed import SINGLE, Dist
from diagnostics.train.optimisation import Optimisation
from diagnostics.train.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where training stands: at the start, or as a resume point (checkpoints/last.pt) left it."""

    start_epoch: int = 0
    best: float = -np.inf  # the best merit so far (higher is better)
    bad: int = 0  # epochs since the best
    run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False  # early-stopped: only the steps after the loop remain


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


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file: a crash mid-write never corrupts the resume point."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def resume_state(
    run_dir: Path,
    resume: str | Path | None,
    model: torch.nn.Module,
    opt: Optimisation,
    runtime: Runtime,
    ctx: Dist = SINGLE,
) -> LoopState:
    """A fresh start, or the resume point loaded into the model, optimiser and RNGs. Under
    torchrun rank 0 reads it and every rank loads the same."""
    if resume in (None, ""):
        return LoopState()
    state = ctx.on_main(lambda: _read_resume_point(run_dir))
    if state is None:
        return LoopState()
    model.load_state_dict(state["model"])
    if opt.ema is not None and state.get("ema") is not None:
        opt.ema.load_state_dict(state["ema"])
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the run began without fp16 AMP
        opt.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    # Under torchrun every epoch reseeds torch per rank (distributed.epoch_seed).
    if not ctx.launched:
        restore_cuda_rng(state.get("cuda_rng"), runtime.device)
    runtime.np_rng.bit_generator.state = state["numpy_rng"]
    if ctx.is_main:
        log.info(
            "resuming %s after epoch %d (written by %d process(es), continued by %d)",
            run_dir.name,
            state["epoch"] + 1,
            state.get("processes", 1),
            ctx.world,
        )
    return LoopState(
        start_epoch=state["epoch"] + 1,
        best=state["best"],
        bad=state["bad"],
        run_id=state.get("run_id"),
        history=state.get("history", []),
        stopped=bool(state.get("stopped")),
    )


def restore_cuda_rng(saved: Any, device: torch.device) -> None:
    """The CUDA RNG state a resume point saved, into `device` when training on CUDA; skipped
    when it saved none or there is no CUDA here. `saved` is the training GPU's state (a byte
    tensor), or, from resume points written before, one state per GPU visible then: as many of
    those as this machine has GPUs are restored, so a resume on a machine with fewer GPUs works
    (torch.cuda.set_rng_state_all would raise IndexError)."""
    if saved is None or device.type != "cuda" or not torch.cuda.is_available():
        return
    if isinstance(saved, torch.Tensor):
        torch.cuda.set_rng_state(saved, device)
        return
    states = list(saved)
    dropped = len(states) - torch.cuda.device_count()
    for index, rng in enumerate(states[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(rng, index)
    if dropped > 0:
        log.info("resume point has CUDA RNG states of %d more GPUs than here: not used", dropped)


def cuda_rng(device: torch.device) -> torch.Tensor | None:
    """The training GPU's RNG state (only that one: a resume may run with fewer GPUs), or None
    when training on the CPU."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _read_resume_point(run_dir: Path) -> dict[str, Any] | None:
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return None
    # Load on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
    state: dict[str, Any] = torch.load(last, map_location="cpu", weights_only=False)
    if state.get("finished"):
        raise ValueError(f"{run_dir.name} has finished; start a new run instead of resuming")
    return state


def save_resume_point(
    path: Path,
    model: torch.nn.Module,
    opt: Optimisation,
    runtime: Runtime,
    state: LoopState,
    epoch: int,
    processes: int = 1,
) -> None:
    """Everything a resume needs to continue after `epoch` as if never stopped. `model` is the
    network itself, never its DDP wrapper; `processes` is for the record only."""
    atomic_save(
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
            "cuda_rng": cuda_rng(runtime.device),
            "processes": processes,
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
    atomic_save(state, last)
