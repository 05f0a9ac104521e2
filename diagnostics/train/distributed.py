"""Several processes training one CXR model: `diagnostics train cxr --nproc N` under torchrun.

The command re-runs itself under `torch.distributed.run` (torchrun) with an internal flag
(`launch_command`); every process is one rank of a `torch.distributed` process group
(`process_group`: NCCL on CUDA, one GPU per local rank; gloo on CPU), and the network is
wrapped in DistributedDataParallel (`wrap`), which averages the gradients of every step.

`Dist` is what the training steps ask of the group:

- the rank; rank 0 (`is_main`) alone writes the run folder and checkpoints, logs to MLflow,
  calibrates, exports and registers. The other ranks stop after the epoch loop;
- `shard`: this rank's share of a list, by torch's `DistributedSampler` (shuffle off: the
  epoch's order is drawn before, from the run's seeded numpy stream, the same on every rank and
  the same as a one-process run draws, so a global batch holds the same images either way).
  The sampler pads the last shares by repeating items, so that every rank has as many;
  `repeats` marks them, and they weigh nothing in the loss;
- `global_mean`: the loss of a global batch from each rank's sums and counts (one all_reduce
  of the counts), so that DDP's gradient averaging gives the mean over the whole global batch,
  as one process computes it, however unevenly the known labels fall across the ranks;
- `gather`: every rank's predictions to every rank, de-duplicated by sample index (the
  padding) and put back in the split's order, before each epoch's AUROC, validation loss, model
  selection and early stopping, so every rank decides the same. After the loop, rank 0 alone
  predicts the whole validation and test splits with the best weights (no shares, so nothing
  to de-duplicate) for the temperatures, thresholds and reports (`calibrate`);
- `on_main` (rank 0 does it, the others get the result or stop), `broadcast`, `all_true`,
  `mean`, `total`, `sync_buffers`, `barrier`; `leave`: all ranks leave the group together
  after the epoch loop, and rank 0 goes on alone.

The global batch: `train.batch_size` is the batch of one optimiser step across all ranks;
each of W ranks takes batch_size / W images (batch_size must divide by W). Learning rate,
schedule and steps per epoch are those of a one-process run with the same config.

BatchNorm: on CUDA with more than one rank the network's BatchNorm layers become SyncBatchNorm
(statistics over the global batch, as in one process). On CPU torch has no SyncBatchNorm
(torch 2.14: "SyncBatchNorm expected input tensor to be on GPU"), so each rank normalises over
its own batch_size / W images; DDP copies rank 0's running statistics to the others at every
step, and `sync_buffers` before each validation.

Collectives time out after $DIAGNOSTICS_DDP_TIMEOUT_S seconds (`collective_timeout`, default
10 minutes): a rank still waiting then fails, and torchrun stops the others. With NCCL,
TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (unless set otherwise) makes a failed or timed-out collective
abort its communicator and end the process, instead of leaving the rank blocked in a CUDA
synchronisation where it cannot run Python (nor its SIGTERM handler).

For tests and debugging, two environment variables (read at run time, never at import):
`DIAGNOSTICS_TRAIN_DEBUG_DIR` makes every rank append one JSON line per epoch to
`rank<R>.jsonl` there (rows trained and validated, per-step losses, a parameter checksum), and
`DIAGNOSTICS_TRAIN_FAIL_AT=<rank>:<epoch>` makes that rank raise at the start of that epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

DEBUG_DIR_ENV = "DIAGNOSTICS_TRAIN_DEBUG_DIR"
FAIL_AT_ENV = "DIAGNOSTICS_TRAIN_FAIL_AT"
TIMEOUT_ENV = "DIAGNOSTICS_DDP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0  # a collective waiting longer than this fails the run
NCCL_ASYNC_ERROR_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


class DistributedError(RuntimeError):
    """A multi-process run cannot start as asked (GPUs, batch size, launch options)."""


class PeerFailed(RuntimeError):
    """Rank 0 failed in a step the other ranks wait on; its own error says why."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the group. The default is one process with no group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    node_rank: int = 0
    backend: str | None = None  # "nccl" or "gloo" under torchrun; None: one process, no group

    @property
    def launched(self) -> bool:
        """Under torchrun (even with one process)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """More than one rank: data is split and gradients averaged."""
        return self.world > 1

    @property
    def device(self) -> torch.device:
        """Where collectives' tensors live: this rank's GPU with NCCL, else the CPU."""
        return (
            torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        )

    # ----------------------------------------------------------------- data

    def shard(self, items: np.ndarray, epoch: int = 0) -> np.ndarray:
        """This rank's share of `items`, in order: DistributedSampler without shuffle gives rank r
        items r, r + W, r + 2W, ..., padded with the first items so every share has the same
        length. With per-rank batches of batch_size / W, step s of all ranks together covers
        items[s * batch_size : (s + 1) * batch_size]: the global batch of one process."""
        if not self.sharded:
            return items
        from torch.utils.data.distributed import DistributedSampler

        sampler: DistributedSampler[int] = DistributedSampler(
            range(len(items)),  # type: ignore[arg-type]  # a Sized is all it reads
            num_replicas=self.world,
            rank=self.rank,
            shuffle=False,
            drop_last=False,
        )
        sampler.set_epoch(epoch)  # no effect without shuffle; kept so shuffle=True stays correct
        positions = np.fromiter(iter(sampler), dtype=np.int64, count=sampler.num_samples)
        return items[positions]

    def repeats(self, n: int) -> np.ndarray:
        """Which entries of this rank's `shard` of n items are the sampler's padding: items
        repeated (already in the epoch) so that every share has the same length. Entry j of
        rank r's share is item r + jW of the padded list, a repeat when that is n or more."""
        if not self.sharded:
            return np.zeros(n, dtype=bool)
        per_rank = -(-n // self.world)  # DistributedSampler.num_samples without drop_last
        return self.rank + self.world * np.arange(per_rank) >= n

    def gather(self, rows: np.ndarray, values: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Every rank's `values` for its sample indices `rows`, collected on every rank and
        returned in the order of `order` (each sample once; the sampler's padding dropped)."""
        if not self.sharded:
            return dedupe(rows, values, order)
        parts = self.all_gather((np.asarray(rows), np.asarray(values)))
        all_rows = np.concatenate([p[0] for p in parts])
        all_values = np.concatenate([p[1] for p in parts])
        return dedupe(all_rows, all_values, order)

    # ----------------------------------------------------------------- collectives

    def on_main(self, fn: Callable[[], T]) -> T:
        """`fn()` on rank 0, its result sent to every rank. When it raises, rank 0 raises it and
        the other ranks raise PeerFailed, instead of waiting for a result that never comes."""
        if not self.sharded:
            return fn()
        value: Any = None
        failed = False
        error: BaseException | None = None
        if self.is_main:
            try:
                value = fn()
            except BaseException as exc:
                failed, error = True, exc
        box = [(None, True) if failed else (value, False)]
        self._broadcast_objects(box)
        if error is not None:
            raise error
        result, failed = box[0]
        if failed:
            raise PeerFailed("rank 0 failed (its own error says why)")
        return cast(T, result)

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.sharded:
            return obj
        box = [obj]
        self._broadcast_objects(box)
        return box[0]

    def _broadcast_objects(self, box: list[Any]) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0, device=self.device)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.sharded:
            return [obj]
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def all_true(self, flag: bool) -> bool:
        """True when `flag` is true on every rank."""
        if not self.sharded:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def mean(self, values: Sequence[float]) -> list[float]:
        """The element-wise mean of every rank's `values` (same length on every rank)."""
        if not self.sharded:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in (t / self.world).cpu().tolist()]

    def total(self, value: int) -> int:
        """The sum of `value` over the ranks."""
        if not self.sharded:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item())

    def global_mean(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The loss whose gradient, once DDP has averaged it over the ranks, is that of the
        global batch's mean: world * sums / (counts summed over the ranks), element-wise, from
        this rank's `sums` of per-item losses (with their graph) and `counts` of items. Only
        the counts are reduced (detached: one small all_reduce); averaged over the ranks, the
        values are the global means. A zero global count gives 0. One process: sums / counts."""
        if not self.sharded:
            return sums / counts.clamp(min=1)
        import torch.distributed as dist

        total = counts.detach().to(device=self.device, dtype=sums.dtype).clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return self.world * sums / total.to(sums.device).clamp(min=1)

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) into every rank's `module`: with
        BatchNorm per rank, each rank's last step moved its own statistics."""
        if not self.sharded:
            return
        import torch.distributed as dist

        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def leave(self) -> None:
        """Every rank leaves the group together, once the collectives are over (after the epoch
        loop). NCCL's teardown wants all ranks at once; rank 0 then goes on alone."""
        if not self.launched:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()

    def barrier(self) -> None:
        if not self.sharded:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()


SINGLE = Dist()


def dedupe(rows: np.ndarray, values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """`values` (one per entry of `rows`, which may repeat) for the samples `order`, in that
    order, each once (the first of its repeats). Raises when a sample of `order` is missing."""
    rows, order = np.asarray(rows), np.asarray(order)
    unique, first = np.unique(rows, return_index=True)
    pos = np.searchsorted(unique, order)
    found = pos < len(unique)
    found[found] &= unique[pos[found]] == order[found]
    if not found.all():
        missing = order[~found]
        raise ValueError(f"no prediction gathered for {len(missing)} samples, e.g. {missing[:5]}")
    return values[first[pos]]


# --------------------------------------------------------------------------- the group


def wants_cuda(device: str) -> bool:
    """Whether `train.device` trains on CUDA here (as `runtime.select_device` decides)."""
    return device in ("auto", "cuda") and torch.cuda.is_available()


def check_gpus(nproc: int, available: int) -> None:
    """One GPU per process on this machine, or a clear error."""
    if nproc > available:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise DistributedError(
            f"--nproc {nproc} trains on CUDA with one GPU per process, and this machine has "
            f"{available} GPU{'s' if available != 1 else ''}{where}. Use --nproc {available} "
            "or fewer, or train on CPU processes with --set train.device=cpu."
        )


def check_batch(batch_size: int, world: int) -> None:
    """The global batch must split evenly across the ranks."""
    if batch_size % world:
        down = batch_size // world * world
        near = f"{down} or {down + world}" if down else str(world)
        raise DistributedError(
            f"train.batch_size {batch_size} is the global batch, split across {world} "
            f"processes, so it must divide by {world}: e.g. {near}"
        )


def env_rank() -> int | None:
    """RANK as torchrun sets it, or None outside torchrun."""
    value = os.environ.get("RANK")
    return int(value) if value is not None else None


def collective_timeout() -> timedelta:
    """How long a collective may wait for the other ranks: $DIAGNOSTICS_DDP_TIMEOUT_S seconds,
    10 minutes by default. Long enough for rank 0's checkpoint and MLflow work between epochs;
    short enough that a lost peer (another machine) fails the run within minutes."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise DistributedError(f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds")
    return timedelta(seconds=seconds)


def nccl_error_handling() -> None:
    """NCCL's async error handling on (TORCH_NCCL_ASYNC_ERROR_HANDLING=1, unless set already):
    when a collective fails or times out, the watchdog aborts the communicator and ends the
    process, so a rank blocked in a CUDA synchronisation does not wait for torchrun's SIGKILL.
    Read when the process group is made: call before `init_process_group`."""
    os.environ.setdefault(NCCL_ASYNC_ERROR_ENV, "1")


@contextmanager
def process_group(device: str, batch_size: int) -> Iterator[Dist]:
    """Join the torchrun group: NCCL with one GPU per local rank when training on CUDA, gloo on
    CPU. Left (destroyed) when the block ends normally."""
    import torch.distributed as dist

    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        raise DistributedError(
            "not started by torchrun (no RANK/WORLD_SIZE): use `diagnostics train cxr --nproc N`"
        )
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    node_rank = int(env.get("GROUP_RANK", "0"))
    check_batch(batch_size, world)
    timeout = collective_timeout()
    if wants_cuda(device):
        check_gpus(local_world, torch.cuda.device_count())
        torch.cuda.set_device(local_rank)
        nccl_error_handling()
        backend = "nccl"
    else:
        if device == "cuda":
            log.warning("CUDA was requested but is not available: gloo on CPU processes")
        backend = "gloo"
    dist.init_process_group(backend, timeout=timeout)
    ctx = Dist(rank, world, local_rank, local_world, node_rank, backend)
    if ctx.is_main:
        log.info(
            "%d processes (%d per machine) joined, backend %s; global batch %d, %d per process; "
            "collectives time out after %.0f s",
            world,
            local_world,
            backend,
            batch_size,
            batch_size // world,
            timeout.total_seconds(),
        )
    yield ctx
    # Normally left already (`Dist.leave`). After an error there is no teardown: the other ranks
    # may be blocked in a collective waiting for this one, and NCCL's teardown would wait for
    # them; exiting lets torchrun see the failure and stop them.
    if dist.is_initialized():
        dist.destroy_process_group()


class TrainForward(torch.nn.Module):
    """`net.forward_train` as `forward`: DistributedDataParallel averages the gradients of
    what runs through its own forward, and training calls forward_train."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> Any:
        return self.net.forward_train(x)  # type: ignore[operator]


def prepare(model: torch.nn.Module, device: torch.device, ctx: Dist) -> torch.nn.Module:
    """Before the optimiser is made: SyncBatchNorm on CUDA with several ranks (in place; the
    parameters stay the same objects, the state dict keeps its keys)."""
    if ctx.sharded and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if ctx.is_main:
            log.info("BatchNorm -> SyncBatchNorm: statistics over the global batch")
    elif ctx.sharded and ctx.is_main:
        log.info("BatchNorm per process on CPU (no SyncBatchNorm on CPU)")
    return model


def wrap(model: torch.nn.Module, device: torch.device, ctx: Dist) -> Callable[..., Any]:
    """What a training step calls: `model.forward_train`, through DistributedDataParallel
    when there are several ranks."""
    if not ctx.sharded:
        return model.forward_train  # type: ignore[return-value]
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        TrainForward(model),
        device_ids=[device.index] if device.type == "cuda" else None,
    )  # by default, rank 0's buffers (BatchNorm statistics) go to every rank at each forward


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one rank's epoch (augmentation, dropout): different per rank and
    epoch, the same on a resume."""
    return (seed * 1_000_003 + epoch * 7919 + rank) % (2**63 - 1)


# --------------------------------------------------------------------------- launching


def launch_command(
    worker_args: Sequence[str],
    *,
    nproc: int,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "diagnostics",
    node_rank: int | None = None,
) -> list[str]:
    """The torchrun command that runs `python -m diagnostics <worker_args>` on `nproc`
    processes here, as one of `nnodes` machines.

    One machine without an endpoint: `--standalone` (a rendezvous on a free local port).
    Several machines: a c10d rendezvous at `rdzv_endpoint` under `rdzv_id`, which numbers the
    machines itself; or, with `node_rank`, a static rendezvous whose machine 0 is at
    `rdzv_endpoint` and holds rank 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd += ["--standalone", "--nnodes", "1"]
    elif node_rank is not None:
        if rdzv_endpoint is None:
            raise DistributedError("--node-rank needs --rdzv-endpoint HOST:PORT of machine 0")
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(f"--rdzv-endpoint {rdzv_endpoint!r} is not HOST:PORT")
        cmd += [
            "--nnodes",
            str(nnodes),
            "--node-rank",
            str(node_rank),
            "--master-addr",
            host,
            "--master-port",
            port,
        ]
    else:
        if rdzv_endpoint is None:
            raise DistributedError(
                f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT that every machine reaches"
            )
        cmd += [
            "--nnodes",
            str(nnodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            rdzv_endpoint,
            "--rdzv-id",
            rdzv_id,
        ]
    return [*cmd, "-m", "diagnostics", *worker_args]


# --------------------------------------------------------------------------- tests, debugging


def param_checksum(module: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in order: equal only for bit-identical weights."""
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def debug_enabled() -> bool:
    return bool(os.environ.get(DEBUG_DIR_ENV))


def debug_record(ctx: Dist, record: dict[str, Any]) -> None:
    """One JSON line in $DIAGNOSTICS_TRAIN_DEBUG_DIR/rank<R>.jsonl (nothing when unset)."""
    folder = os.environ.get(DEBUG_DIR_ENV)
    if not folder:
        return
    path = Path(folder) / f"rank{ctx.rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {"rank": ctx.rank, "world": ctx.world, **record}
    with path.open("a") as f:
        f.write(json.dumps(line, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj).__name__)


def maybe_fail(ctx: Dist, epoch: int) -> None:
    """Raise at the start of `epoch` (1-based) on the rank $DIAGNOSTICS_TRAIN_FAIL_AT names."""
    spec = os.environ.get(FAIL_AT_ENV)
    if not spec:
        return
    rank, _, at = spec.partition(":")
    if int(rank) == ctx.rank and int(at) == epoch:
        raise RuntimeError(f"injected failure on rank {ctx.rank} at epoch {epoch} ({FAIL_AT_ENV})")
