"""Where and how a CXR training run does its arithmetic, and where its time goes.

`make_runtime` seeds torch and numpy, sets the threads, and chooses the device and precision
(fp16 AMP on CUDA, bf16 autocast on CPUs with bf16 units, else fp32), and logs the choice.
Under torchrun (`train cxr --nproc N`, `distributed.Dist`) each rank takes its own GPU, or on
CPU its share of the threads, and AMP is for CUDA only: CPU processes train in fp32.
`as_exported` puts the network back into the fp32 arithmetic ONNX Runtime does. `PhaseClock`
counts the seconds of each phase of a run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diagnostics.train.config import LoopConfig
from diagnostics.train.distributed import SINGLE, Dist

log = logging.getLogger(__name__)


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


@dataclass
class Runtime:
    """Where and how the arithmetic runs."""

    device: torch.device
    amp: torch.dtype | None  # autocast dtype; None = fp32
    precision: str  # "fp32", "fp16-amp" or "bf16-autocast"
    channels_last: bool
    np_rng: np.random.Generator  # the epochs' shuffles


def make_runtime(loop: LoopConfig, ctx: Dist = SINGLE) -> Runtime:
    """Seed torch and numpy, set the threads, choose the device and precision.

    Every rank seeds the same way, so every rank builds the same initial weights (DDP also
    copies rank 0's when it wraps the network)."""
    torch.manual_seed(loop.seed)
    np_rng = np.random.default_rng(loop.seed)
    threads = loop.threads
    device = select_device(loop.device)
    if ctx.launched and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)  # one GPU per process
    elif ctx.launched:  # the machine's threads (train.threads, or all) shared by its processes
        threads = max(1, (loop.threads or os.cpu_count() or 1) // ctx.local_world)
    if threads:
        torch.set_num_threads(threads)
    cpu_ranks = ctx.launched and device.type == "cpu"
    amp = autocast_dtype(device, loop.mixed_precision and not cpu_ranks)
    precision = {None: "fp32", torch.float16: "fp16-amp", torch.bfloat16: "bf16-autocast"}[amp]
    if ctx.is_main:
        log.info("precision: %s on %s (%s)", precision, device, _why(amp, device, loop, cpu_ranks))
    return Runtime(device, amp, precision, loop.channels_last, np_rng)


def _why(amp: torch.dtype | None, device: torch.device, loop: LoopConfig, cpu_ranks: bool) -> str:
    """The log line's reason for the precision chosen."""
    if amp == torch.float16:
        return "AMP: torch.autocast fp16 with a GradScaler"
    if amp == torch.bfloat16:
        return "bf16 autocast: this CPU has bf16 units"
    if not loop.mixed_precision:
        return "AMP off: train.mixed_precision is false"
    if cpu_ranks:
        return "AMP off: CPU processes under torchrun train in fp32; AMP is for CUDA"
    return "AMP off: no CUDA, and this CPU has no bf16 units"


def as_exported(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """fp32, contiguous, and on CUDA without TF32: the arithmetic ONNX Runtime will do."""
    model = model.float().to(memory_format=torch.contiguous_format)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return model
