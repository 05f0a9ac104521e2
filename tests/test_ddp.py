"""Multi-process training: `train cxr --nproc 2` (torchrun, DDP, gloo on 2 CPU processes)
against one process, through the real command line, MLflow store and registry.

The tiny CNN, 32 px synthetic images, augmentation off (no random draws), fp32, a global batch
of 8 (4 per process), 2 steps per epoch. With these, one process and two take the same images
in every global batch; what differs is BatchNorm, which on CPU normalises over each process's 4
images, not the 8 of the global batch (torch has no SyncBatchNorm on CPU). Measured on this
machine over 16 steps: per-step losses within 6.6e-4 relative, validation losses within 3e-4;
`--nproc 1` under torchrun was bit-identical to one process. The test allows 2e-3.

The comparison runs on partial labels (`partial_labels`: a third of the images unlabelled, a
fifth of the other labels unknown), so the known labels fall unevenly on the two shares of
each global batch. Measured on this machine over the test's 6 steps: per-step losses within
4.0e-4 relative, validation losses within 8e-5. Before the loss was the global batch's masked
mean (each process divided by its own count of known labels, and DDP averaged the processes),
the second epoch was off by 1.4e-2 and the test failed. `test_two_ranks_loss_and_gradients_...`
checks the same exactly (no BatchNorm), gradients and the sampler's padding included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diagnostics.train.distributed import DEBUG_DIR_ENV, FAIL_AT_ENV
from tests.conftest import REPO, diagnostics_home, tiny_cxr_config

LOSS_RTOL = 2e-3  # per-step train loss and per-epoch validation loss, 2 processes vs 1


def ddp_config(manifest: Path, **train):
    cfg = tiny_cxr_config(
        manifest,
        name="ddp",
        size=32,
        val=0.4,  # 21 training and 19 validation images: both shares are padded
        train={
            "epochs": 3,
            "batch_size": 8,  # the global batch
            "max_steps_per_epoch": 2,
            "mixed_precision": False,
            "select": "last",
            **train,
        },
        tracking={"experiment": "ddp", "registered_model": "cxr-ddp"},
    )
    cfg.augment.enabled = False
    return cfg


def partial_labels(manifest: Path, out: Path) -> Path:
    """`manifest` with a third of its images unlabelled (every finding NaN, as outside images
    are) and a fifth of the other labels unknown: the known labels fall unevenly on the
    processes' shares of each global batch."""
    import pandas as pd

    df = pd.read_csv(manifest)
    df = df.drop(columns=[c for c in df.columns if c.startswith("mask_")])
    df["path"] = [str(manifest.parent / p) for p in df["path"]]
    findings = ["Pneumonia", "Effusion", "Cardiomegaly", "Nodule", "Pneumothorax"]
    for i in range(len(df)):
        for j, finding in enumerate(findings):
            if i % 3 == 0 or (i * 7 + j * 3) % 5 == 0:
                df.loc[i, finding] = np.nan
    df.to_csv(out, index=False)
    return out


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def cli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "DIAGNOSTICS_HOME": str(home), **env}
    environ.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "diagnostics", "train", "cxr", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )


def records(folder: Path) -> dict[int, list[dict]]:
    """rank -> its debug records (distributed.debug_record), in order."""
    out = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        out[int(path.stem[4:])] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def epochs(recs: list[dict]) -> list[dict]:
    return [r for r in recs if "epoch" in r]


def mlflow_client(home: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{home / 'var' / 'mlflow.db'}")


def test_two_processes_match_one_and_track_once(home, synth_png, tmp_path, monkeypatch):
    from diagnostics.train.cxr import train_cxr

    cfg = ddp_config(partial_labels(synth_png, tmp_path / "partial.csv"))
    # The reference: one process, in its own home (so that the 2-process run decodes its cache).
    monkeypatch.setenv(DEBUG_DIR_ENV, str(tmp_path / "one"))
    with diagnostics_home(tmp_path / "one-home"):
        train_cxr(cfg, progress=False, log_to_mlflow=False)
    monkeypatch.delenv(DEBUG_DIR_ENV)

    config = write_config(cfg, tmp_path / "ddp.yaml")
    done = cli(
        "--config", str(config), "--nproc", "2", home=home, **{DEBUG_DIR_ENV: str(tmp_path / "two")}
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("mean val AUROC") == 1  # rank 0 alone reports
    assert "on 2 cpu processes (fp32)" in done.stdout

    (one,) = records(tmp_path / "one").values()
    two = records(tmp_path / "two")
    assert sorted(two) == [0, 1]
    one_epochs, r0, r1 = epochs(one), epochs(two[0]), epochs(two[1])
    assert len(one_epochs) == len(r0) == len(r1) == 3

    # The same initial weights on both ranks and in one process (the seed; before DDP's copy).
    starts = {
        next(r for r in recs if r.get("event") == "start")["params"]
        for recs in (one, *two.values())
    }
    assert len(starts) == 1
    # Each process decoded its half of the image cache (every other image).
    c0, c1 = (next(r for r in two[k] if r.get("event") == "cache") for k in (0, 1))
    assert c0["decoded"] == list(range(0, 40, 2)) and c1["decoded"] == list(range(1, 40, 2))

    train_rows = set(one_epochs[0]["train_share"])
    assert len(train_rows) == 21
    for ref, a, b in zip(one_epochs, r0, r1, strict=True):
        # Identical parameters on both ranks after every epoch (DDP averaged the gradients).
        assert a["params"] == b["params"]
        # Disjoint shares of the epoch's order covering the training split; the sampler pads
        # the shorter share with the first image, the only one both see.
        s0, s1 = a["train_share"], b["train_share"]
        assert len(s0) == len(s1) == 11
        assert set(s0) | set(s1) == train_rows
        assert len(set(s0) & set(s1)) == 1 and s1[-1] == s0[0]
        # Interleaved, the shares are one process's order: every global batch holds the same
        # images in both runs.
        assert [r for pair in zip(s0, s1, strict=True) for r in pair][:21] == ref["train_share"]
        # Validation: disjoint shares covering the split (19 images, one padded) ...
        v0, v1 = a["val_rows"], b["val_rows"]
        assert len(v0) == len(v1) == 10 and set(v0) | set(v1) == set(ref["val_rows"])
        # ... gathered without the padding: the same validation loss on both ranks and, within
        # the BatchNorm tolerance, as one process.
        assert a["val_loss"] == b["val_loss"]
        np.testing.assert_allclose(a["val_loss"], ref["val_loss"], rtol=LOSS_RTOL)
        # The loss curve: each global step's loss (mean over the ranks) against one process's.
        assert a["step_losses"] == b["step_losses"] and len(a["step_losses"]) == 2
        np.testing.assert_allclose(a["step_losses"], ref["step_losses"], rtol=LOSS_RTOL)

    # Rank 0 alone tracked: one MLflow run, one registered version, one run folder.
    client = mlflow_client(home)
    (run,) = client.search_runs(client.get_experiment_by_name("ddp").experiment_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ddp.processes"] == "2" and run.data.tags["ddp.backend"] == "gloo"
    assert run.data.params["precision"] == "fp32"
    (version,) = client.search_model_versions("name='cxr-ddp'")
    assert version.run_id == run.info.run_id
    (run_dir,) = (home / "runs").iterdir()
    assert (run_dir / "model.onnx").is_file()
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["processes"] == 2


@pytest.mark.slow  # a second 2-process run and a resume: about 19 s more on 2 cores
def test_failing_rank_fails_the_command_then_one_process_resumes(home, synth_png, tmp_path):
    from diagnostics.train.cxr import train_cxr

    cfg = ddp_config(synth_png, epochs=2)
    config = write_config(cfg, tmp_path / "ddp.yaml")
    # Rank 1 fails as epoch 2 begins: the command fails, and shows that rank's error.
    done = cli("--config", str(config), "--nproc", "2", home=home, **{FAIL_AT_ENV: "1:2"})
    assert done.returncode != 0
    assert "injected failure on rank 1 at epoch 2" in done.stderr
    assert "training under torchrun failed" in done.stderr
    (run_dir,) = (home / "runs").iterdir()
    point = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert point["processes"] == 2 and point["epoch"] == 0  # epoch 1, written by 2 processes
    client = mlflow_client(home)
    (failed,) = client.search_runs(client.get_experiment_by_name("ddp").experiment_id)
    assert failed.info.status == "FAILED"

    # One process resumes it: epoch 2 only, on the same MLflow run, then registers once.
    result = train_cxr(cfg, resume=run_dir, progress=False)
    assert result.run_id == failed.info.run_id and result.epochs_run == 2
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert len(client.search_model_versions("name='cxr-ddp'")) == 1


# --------------------------------------------------------------------------- no processes


def test_dedupe_drops_the_padding_and_restores_the_order():
    from diagnostics.train.distributed import dedupe

    order = np.array([7, 3, 9, 1, 5])
    rows = np.array([7, 9, 5, 3, 1, 7])  # rank 0: 7, 9, 5; rank 1: 3, 1 and 7 again (padding)
    values = np.array([[70.0], [90.0], [50.0], [30.0], [10.0], [71.0]])
    np.testing.assert_array_equal(dedupe(rows, values, order)[:, 0], [70, 30, 90, 10, 50])
    with pytest.raises(ValueError, match="no prediction gathered for 1 samples"):
        dedupe(rows[:-2], values[:-2], order)


def test_shards_are_distributed_sampler_shares_of_the_global_batch():
    from torch.utils.data.distributed import DistributedSampler

    from diagnostics.train.distributed import Dist

    order = np.arange(100, 121)  # 21 items, 3 ranks: shares of 7
    shares = [Dist(rank=r, world=3, backend="gloo").shard(order) for r in range(3)]
    for r, share in enumerate(shares):
        sampler = DistributedSampler(range(21), num_replicas=3, rank=r, shuffle=False)
        np.testing.assert_array_equal(share, order[list(sampler)])
    # Per-rank batches of 2 (a global batch of 6): step s of all ranks = items 6s..6s+5.
    step1 = np.sort(np.concatenate([s[2:4] for s in shares]))
    np.testing.assert_array_equal(step1, order[6:12])
    assert Dist().shard(order) is order  # one process: everything, as it is
    assert not Dist().repeats(21).any()


@pytest.mark.parametrize(("n", "world"), [(21, 2), (21, 3), (7, 4), (3, 4), (24, 4), (1, 2)])
def test_repeats_mark_the_samplers_padding(n, world):
    from diagnostics.train.distributed import Dist

    order = np.arange(500, 500 + n)
    ranks = [Dist(rank=r, world=world, backend="gloo") for r in range(world)]
    shares = [d.shard(order) for d in ranks]
    repeats = [d.repeats(n) for d in ranks]
    assert all(len(r) == len(s) for r, s in zip(repeats, shares, strict=True))
    assert sum(int(r.sum()) for r in repeats) == len(shares[0]) * world - n
    # Interleaved, the shares without their repeats are the order, each item once.
    kept = [
        s[j]
        for j in range(len(shares[0]))
        for s, r in zip(shares, repeats, strict=True)
        if not r[j]
    ]
    np.testing.assert_array_equal(kept, order)


# --------------------------------------------------------------------------- the global loss


class _Heads(torch.nn.Module):
    """Findings logits and a population logit: what `forward_train` returns."""

    def __init__(self) -> None:
        super().__init__()
        self.findings = torch.nn.Linear(5, 3)
        self.population = torch.nn.Linear(5, 1)

    def forward(self, x):
        return self.findings(x), self.population(x)[:, 0]


def _loss_args(x, y, inside, net):
    logits, population = net(x)
    return logits, y, population, inside, torch.tensor([2.0, 1.0, 0.5]), 0.1, 0.3


def _rank_step(rank, world, store, batch, weights, out):
    """One rank of a gloo group: the DDP step on its share, its loss and gradients saved."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from diagnostics.train.cxr import batch_loss
    from diagnostics.train.distributed import Dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        ctx = Dist(rank=rank, world=world, backend="gloo")
        x, y, inside = batch
        mine = ctx.shard(np.arange(len(x)))
        net = _Heads()
        net.load_state_dict(weights)
        ddp = DistributedDataParallel(net)
        loss = batch_loss(
            *_loss_args(x[mine], y[mine], inside[mine], ddp), ctx, ~ctx.repeats(len(x))
        )
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters()]
        torch.save({"loss": loss.item(), "grads": grads}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_loss_and_gradients_are_one_process_with_partial_labels(tmp_path):
    """Two gloo processes (DDP) against one, on a global batch whose known labels fall unevenly
    on the ranks (rank 1's images are mostly unlabelled) and with a repeat of the sampler's
    padding on rank 1: the mean of the ranks' losses is the one-process loss, and the averaged
    gradients are the one-process gradients."""
    import torch.multiprocessing as mp

    from diagnostics.train.cxr import batch_loss
    from diagnostics.train.distributed import Dist

    torch.manual_seed(0)
    nan = float("nan")
    x = torch.randn(7, 5)  # 7 images, 2 ranks: rank 0 gets 0, 2, 4, 6; rank 1 1, 3, 5 and 0 again
    y = torch.tensor(
        [
            [1, 0, 1],
            [nan, nan, 1],
            [0, 1, 1],
            [nan, nan, nan],  # an outside image: no finding labels
            [1, 1, 0],
            [0, nan, nan],
            [0, 0, 1],
        ]
    )
    inside = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    net = _Heads()
    ref = batch_loss(*_loss_args(x, y, inside, net))  # one process: the whole batch
    ref.backward()
    ref_grads = [p.grad.clone() for p in net.parameters()]
    weights = {k: v.clone() for k, v in net.state_dict().items()}

    # Each rank's own masked mean, averaged (the loss before the fix): far from one process's.
    shares = [Dist(rank=r, world=2, backend="gloo").shard(np.arange(7)) for r in range(2)]
    naive = np.mean([batch_loss(*_loss_args(x[s], y[s], inside[s], net)).item() for s in shares])
    assert abs(naive - ref.item()) > 0.02 * ref.item()

    mp.spawn(
        _rank_step,
        args=(2, tmp_path / "store", (x, y, inside), weights, tmp_path),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    np.testing.assert_allclose(np.mean([r["loss"] for r in ranks]), ref.item(), rtol=1e-6)
    for g0, g1, g in zip(ranks[0]["grads"], ranks[1]["grads"], ref_grads, strict=True):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)  # DDP: the same on both ranks
        torch.testing.assert_close(g0, g, rtol=1e-5, atol=1e-7)


def test_one_process_loss_is_the_masked_mean():
    from diagnostics.train.batches import masked_bce
    from diagnostics.train.cxr import batch_loss
    from diagnostics.train.distributed import Dist

    torch.manual_seed(1)
    logits, y = torch.randn(4, 3), torch.tensor([[1.0, float("nan"), 0.0]] * 4)
    expected = masked_bce(logits, y, None, 0.0)
    assert torch.equal(batch_loss(logits, y, None, None, None, 0.0, 0.0), expected)
    # --nproc 1 under torchrun: launched, not sharded: the same bits
    ctx = Dist(backend="gloo")
    assert torch.equal(batch_loss(logits, y, None, None, None, 0.0, 0.0, ctx), expected)


# --------------------------------------------------------------------------- cache, resume, timeout


def test_two_runs_building_one_cache_at_once_do_not_share_a_file(synth_png, tmp_path, monkeypatch):
    """A second run on this machine starts building the same cache while the first writes
    through its map: each writes its own file, both end with the whole cache in place."""
    from diagnostics.data.cache import build_cache
    from diagnostics.train import cxr_data
    from diagnostics.train.distributed import Dist

    paths = sorted(str(p) for p in (synth_png.parent / "images").glob("*.png"))[:5]
    spec = ddp_config(synth_png).preprocess
    cache_dir = tmp_path / "cache"
    ctx = Dist(backend="gloo")  # one process: the collectives are no-ops
    real_open = np.lib.format.open_memmap
    made: list[str] = []
    second: list[np.ndarray] = []

    def open_memmap(path, *args, **kwargs):
        out = real_open(path, *args, **kwargs)
        if kwargs.get("mode") == "w+":
            made.append(Path(path).name)
            if len(made) == 1:  # the first run made its file: the second runs to the end
                second.append(cxr_data._shared_cache(paths, spec, cache_dir, False, ctx))
        return out

    monkeypatch.setattr(np.lib.format, "open_memmap", open_memmap)
    first = cxr_data._shared_cache(paths, spec, cache_dir, False, ctx)
    monkeypatch.undo()
    assert len(made) == 2 and made[0] != made[1] and all("-node0" in m for m in made)
    expected = build_cache(paths, spec, tmp_path / "reference", progress=False)
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second[0], expected)
    assert [p.name for p in cache_dir.iterdir()] == [f"{Path(made[0]).name.split('.tmp-')[0]}.npy"]


def test_resume_restores_cuda_rng_of_the_gpus_there_are(monkeypatch):
    """A resume point may hold one CUDA RNG state per GPU of the machine that wrote it: on a
    machine with fewer (none here), the ones there are are restored, and nothing fails."""
    from diagnostics.train.checkpoints import restore_cuda_rng

    cuda = torch.device("cuda")
    # This machine, for real: no CUDA, nothing restored; with CUDA, two states too many.
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    states = [torch.cuda.get_rng_state(i) for i in range(n)] or [torch.zeros(16, dtype=torch.uint8)]
    restore_cuda_rng(states + states[:1] * 2, cuda)
    restore_cuda_rng(None, cuda)

    # One GPU, a resume point written on three: GPU 0's state, the others left out.
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda,
        "set_rng_state",
        lambda state, device="cuda": calls.append((int(state[0]), device)),
    )
    saved = [torch.tensor([k], dtype=torch.uint8) for k in (5, 6, 7)]
    restore_cuda_rng(saved, cuda)
    assert calls == [(5, 0)]
    calls.clear()
    restore_cuda_rng(torch.tensor([9], dtype=torch.uint8), torch.device("cuda", 0))  # new format
    assert calls == [(9, torch.device("cuda", 0))]
    calls.clear()
    restore_cuda_rng(saved, torch.device("cpu"))  # training on the CPU: no CUDA state
    assert calls == []


def test_collective_timeout_and_nccl_error_handling(monkeypatch):
    from diagnostics.train.distributed import (
        DistributedError,
        collective_timeout,
        nccl_error_handling,
    )

    monkeypatch.delenv("DIAGNOSTICS_DDP_TIMEOUT_S", raising=False)
    assert collective_timeout() == timedelta(minutes=10)
    monkeypatch.setenv("DIAGNOSTICS_DDP_TIMEOUT_S", "90")
    assert collective_timeout() == timedelta(seconds=90)
    for bad in ("0", "-5", "ten", "inf", "nan"):
        monkeypatch.setenv("DIAGNOSTICS_DDP_TIMEOUT_S", bad)
        with pytest.raises(DistributedError, match="not a positive number of seconds"):
            collective_timeout()
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    nccl_error_handling()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # the user's own choice stays
    nccl_error_handling()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_launch_commands():
    from diagnostics.train.distributed import DistributedError, launch_command

    one = launch_command(["train", "cxr"], nproc=2)
    assert one[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node", "2"]
    assert "--standalone" in one and one[-4:] == ["-m", "diagnostics", "train", "cxr"]
    c10d = launch_command(["x"], nproc=8, nnodes=2, rdzv_endpoint="h0:29400", rdzv_id="job")
    assert {"--rdzv-backend", "c10d", "--rdzv-endpoint", "h0:29400", "job"} <= set(c10d)
    static = launch_command(["x"], nproc=8, nnodes=2, rdzv_endpoint="h0:29500", node_rank=1)
    i = static.index("--node-rank")
    assert static[i + 1] == "1" and static[static.index("--master-addr") + 1] == "h0"
    with pytest.raises(DistributedError, match="needs --rdzv-endpoint"):
        launch_command(["x"], nproc=8, nnodes=2)


def test_gpu_and_batch_checks_say_what_to_do():
    from diagnostics.train.distributed import DistributedError, check_batch, check_gpus

    with pytest.raises(DistributedError, match=r"--nproc 4 .* has 2 GPUs.*--nproc 2 or fewer"):
        check_gpus(4, 2)
    check_gpus(2, 2)
    with pytest.raises(DistributedError, match=r"must divide by 3: e\.g\. 6 or 9"):
        check_batch(8, 3)
    check_batch(8, 2)


def test_bad_nproc_is_refused_before_launching(home, synth_png, tmp_path):
    config = write_config(ddp_config(synth_png), tmp_path / "ddp.yaml")
    zero = cli("--config", str(config), "--nproc", "0", home=home)
    assert zero.returncode == 2 and "Invalid value for '--nproc'" in zero.stderr
    three = cli("--config", str(config), "--nproc", "3", home=home)  # 8 does not split in 3
    assert three.returncode == 2 and "must divide by 3" in three.stderr
    worker = cli("--config", str(config), "--ddp-worker", home=home)  # not under torchrun
    assert worker.returncode == 2 and "--ddp-worker is internal" in worker.stderr
    assert not (home / "runs").exists()


# --------------------------------------------------------------------------- CUDA

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_cuda_ranks_use_nccl_and_amp(home, synth_png, tmp_path):
    """One process per GPU (up to 2): NCCL, fp16 AMP with a GradScaler, SyncBatchNorm."""
    n = min(2, torch.cuda.device_count())
    cfg = ddp_config(synth_png, device="cuda", mixed_precision=True)
    config = write_config(cfg, tmp_path / "ddp.yaml")
    done = cli(
        "--config",
        str(config),
        "--nproc",
        str(n),
        home=home,
        **{DEBUG_DIR_ENV: str(tmp_path / "d")},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (
        "precision: fp16-amp on cuda:0 (AMP: torch.autocast fp16 with a GradScaler)" in done.stderr
    )
    client = mlflow_client(home)
    (run,) = client.search_runs(client.get_experiment_by_name("ddp").experiment_id)
    assert run.data.tags["ddp.backend"] == "nccl" and run.data.params["precision"] == "fp16-amp"
    recs = records(tmp_path / "d")
    last = [epochs(recs[k])[-1]["params"] for k in sorted(recs)]
    assert len(set(last)) == 1  # identical parameters on every GPU
    if n > 1:
        assert "SyncBatchNorm" in done.stderr


@pytest.mark.gpu
@needs_cuda
def test_more_processes_than_gpus_is_a_clear_error(home, synth_png, tmp_path):
    n = torch.cuda.device_count() + 1
    cfg = ddp_config(synth_png, device="cuda", batch_size=8 * n)
    config = write_config(cfg, tmp_path / "ddp.yaml")
    done = cli("--config", str(config), "--nproc", str(n), home=home)
    assert done.returncode == 2
    assert f"--nproc {n} trains on CUDA with one GPU per process" in done.stderr
