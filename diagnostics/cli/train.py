"""`diagnostics train cxr|risk`, and the summaries the demo prints too.

`train cxr --nproc N` runs the same command again under torchrun, once per process, with the
internal `--ddp-worker` flag (`_launch`); see `diagnostics.train.distributed`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from diagnostics.cli.common import SetOption, _fail, _load_train_config, _mlflow_ui_hint, _training


@_training
def train_cxr_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config")],
    set_: SetOption = None,
    resume: Annotated[
        str | None,
        typer.Option(help="run folder to resume, or 'last' for this config's latest run"),
    ] = None,
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="do not log to MLflow")] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            min=1,
            help="processes on this machine: train under torchrun with DistributedDataParallel "
            "(one GPU each on CUDA, NCCL; else CPU processes, gloo). train.batch_size stays the "
            "global batch, split across all processes",
        ),
    ] = None,
    nnodes: Annotated[
        int, typer.Option("--nnodes", min=1, help="machines taking part; run this on each")
    ] = 1,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option(
            "--rdzv-endpoint", help="HOST:PORT that every machine reaches (several machines)"
        ),
    ] = None,
    rdzv_id: Annotated[
        str | None,
        typer.Option("--rdzv-id", help="the job's ID, the same on every machine; default: name"),
    ] = None,
    node_rank: Annotated[
        int | None,
        typer.Option(
            "--node-rank",
            min=0,
            help="this machine's number (0 to nnodes-1) for a fixed rendezvous: machine 0 is at "
            "--rdzv-endpoint and holds rank 0, which writes the run folder and logs to MLflow",
        ),
    ] = None,
    ddp_worker: Annotated[bool, typer.Option("--ddp-worker", hidden=True)] = False,
) -> None:
    """Train, calibrate, evaluate, export to ONNX, log to MLflow and register the model."""
    cfg = _load_train_config(config, set_)
    if ddp_worker:
        _worker(cfg, resume, no_mlflow)
        return
    if nproc is not None:
        launch = Launch(nproc, nnodes, rdzv_endpoint, rdzv_id, node_rank)
        _launch(cfg, config, set_, resume, no_mlflow, launch)
        return
    if nnodes != 1 or rdzv_endpoint or rdzv_id or node_rank is not None:
        raise _fail("--nnodes, --rdzv-endpoint, --rdzv-id and --node-rank go with --nproc N")

    from diagnostics.data.cache import CacheBuildError
    from diagnostics.data.cxr import DatasetError
    from diagnostics.models.registry import UnknownModelError
    from diagnostics.train.cxr import train_cxr
    from diagnostics.train.export import ExportParityError

    try:
        result = train_cxr(cfg, resume=resume, log_to_mlflow=not no_mlflow)
    except (DatasetError, FileNotFoundError, ValueError, CacheBuildError, ExportParityError) as exc:
        raise _fail(str(exc)) from None
    except UnknownModelError as exc:
        raise _fail(str(exc)) from None
    typer.echo(_summary_table(result))
    if not no_mlflow:
        typer.echo(_mlflow_ui_hint())


@dataclass
class Launch:
    """How `--nproc` runs: processes per machine, machines, and their rendezvous."""

    nproc: int
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    node_rank: int | None = None


def _launch(
    cfg: Any,
    config: Path,
    set_: list[str] | None,
    resume: str | None,
    no_mlflow: bool,
    launch: Launch,
) -> None:
    """Run this command again under torchrun, `--ddp-worker` on each of its processes; exit
    with its status. The workers print their own errors and rank 0 the summary."""
    from diagnostics.train import distributed as D

    try:
        if launch.node_rank is not None and launch.node_rank >= launch.nnodes:
            raise D.DistributedError(
                f"--node-rank {launch.node_rank} is not below --nnodes {launch.nnodes}"
            )
        D.check_batch(cfg.train.batch_size, launch.nproc * launch.nnodes)
        if D.wants_cuda(cfg.train.device):
            import torch

            D.check_gpus(launch.nproc, torch.cuda.device_count())
        worker = ["train", "cxr", "--config", str(config)]
        for override in set_ or []:
            worker += ["--set", override]
        if resume:
            worker += ["--resume", resume]
        if no_mlflow:
            worker.append("--no-mlflow")
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            worker.insert(0, "--verbose")
        cmd = D.launch_command(
            [*worker, "--ddp-worker"],
            nproc=launch.nproc,
            nnodes=launch.nnodes,
            rdzv_endpoint=launch.rdzv_endpoint,
            rdzv_id=launch.rdzv_id or cfg.name,
            node_rank=launch.node_rank,
        )
    except D.DistributedError as exc:
        raise _fail(str(exc)) from None
    logging.getLogger(__name__).info("torchrun: %s", " ".join(cmd[1:]))
    env = dict(os.environ)
    # Each process's share of the machine's threads (torchrun would set 1, with a banner);
    # training sets torch's own count from train.threads (runtime.make_runtime).
    threads = max(1, (cfg.train.threads or os.cpu_count() or 1) // launch.nproc)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    code = _wait(cmd, env)
    if code != 0:
        typer.secho(
            f"error: training under torchrun failed (exit status {code}); the failing rank's "
            "error is shown above",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=code if 0 < code < 256 else 1)


def _wait(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun and wait. A Ctrl-C reaches torchrun too (it stops its workers); a SIGTERM
    sent to this process alone is passed on to it."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd, env=env)
    before = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue  # torchrun got the same SIGINT; wait for it to stop its workers
    finally:
        signal.signal(signal.SIGTERM, before)


def _worker(cfg: Any, resume: str | None, no_mlflow: bool) -> None:
    """One torchrun process (`--ddp-worker`): its errors go to stderr with its rank, and into
    torchrun's error file (`record`), so the failing rank and its error are shown."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import record

    from diagnostics.train import distributed as D

    rank = D.env_rank()
    if rank is None:
        raise _fail("--ddp-worker is internal: run `diagnostics train cxr --config C --nproc N`")
    # rank 0 logs; the other ranks only warnings and errors, each line with its rank
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
        )
    if rank != 0:
        root.setLevel(max(root.level, logging.WARNING))
    signal.signal(signal.SIGTERM, _unwind_on_sigterm)
    try:
        record(_worker_run)(cfg, resume, no_mlflow, rank)
    finally:  # unwound: a SIGTERM now ends the process (no SystemExit inside atexit hooks)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _unwind_on_sigterm(signum: int, frame: Any) -> None:
    """torchrun stops the other ranks with SIGTERM when one fails: unwind (SystemExit), so that
    rank 0's MLflow run ends FAILED rather than staying RUNNING. A rank already unwinding from
    its own error (the lost peer) carries on undisturbed, ending its run on the way."""
    if sys.exc_info()[0] is None:
        sys.exit(128 + signum)


def _worker_run(cfg: Any, resume: str | None, no_mlflow: bool, rank: int) -> None:
    from diagnostics.data.cache import CacheBuildError
    from diagnostics.data.cxr import DatasetError
    from diagnostics.models.registry import UnknownModelError
    from diagnostics.train.cxr import train_cxr_distributed
    from diagnostics.train.distributed import DistributedError, PeerFailed
    from diagnostics.train.export import ExportParityError

    known = (
        DatasetError,
        FileNotFoundError,
        ValueError,
        CacheBuildError,
        ExportParityError,
        UnknownModelError,
        DistributedError,
    )
    try:
        result = train_cxr_distributed(cfg, resume=resume, log_to_mlflow=not no_mlflow)
    except PeerFailed as exc:
        typer.secho(f"rank {rank}: stopped: {exc}", err=True)
        raise SystemExit(1) from None
    except known as exc:
        typer.secho(f"error: rank {rank}: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
    if result is not None:  # rank 0
        typer.echo(_summary_table(result))
        if not no_mlflow:
            typer.echo(_mlflow_ui_hint())


@_training
def train_risk_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML risk config with schema")],
    set_: SetOption = None,
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="do not log to MLflow")] = False,
) -> None:
    """Train a calibrated risk model on a table, report governance metrics, export ONNX."""
    from diagnostics.configio import ConfigError
    from diagnostics.tables import SchemaError
    from diagnostics.train.risk import load_risk_config, train_risk

    try:
        cfg = load_risk_config(config, set_)
        result = train_risk(cfg, log_to_mlflow=not no_mlflow)
    except (ConfigError, SchemaError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(_risk_summary(result))
    if not no_mlflow:
        typer.echo(_mlflow_ui_hint())


def _summary_table(result: Any) -> str:
    lines = [
        f"{'finding':<16}{'val AUROC':>10}{'95% CI':>16}{'threshold':>11}{'sens':>7}{'spec':>7}"
        f"{'temp':>7}"
    ]
    for f, r in result.val.items():
        ci = f"{r['auroc_lo']:.3f}-{r['auroc_hi']:.3f}"
        lines.append(
            f"{f:<16}{r['auroc']:>10.4f}{ci:>16}{r['threshold']:>11.3f}{r['sensitivity']:>7.3f}"
            f"{r['specificity']:>7.3f}{r['temperature']:>7.2f}"
        )
    lines.append(f"mean val AUROC {result.mean_val_auroc:.4f}")
    processes = getattr(result, "processes", 1)
    on = f"{processes} {result.device} processes" if processes > 1 else result.device
    lines.append(
        f"trained {result.epochs_run} epochs in {result.seconds:.0f} s on {on} "
        f"({result.precision}); ONNX parity max |dp| {result.parity:.1e}"
    )
    if result.timing:
        lines.append("time   " + ", ".join(f"{k} {v:.0f} s" for k, v in result.timing.items()))
    check = result.metadata.population.check if result.metadata.population else None
    if check is not None:
        m = check.metrics
        lines.append(
            f"population check ({result.metadata.population.age_text()}): AUROC "
            f"{m['auroc']:.4f}; refuses {100 * m['outside_refused']:.1f}% of "
            f"{int(m['outside_held_images'])} held-out outside images and "
            f"{100 * m['inside_val_refused']:.1f}% of validation images"
        )
    lines.append(f"ONNX   {result.onnx_path}")
    lines.append(f"sha256 {result.sha256}")
    if result.int8:
        worst = result.int8.get("gate_auroc_delta")  # the largest |change| over the findings
        change = f"{worst:.4f}" if isinstance(worst, float) and worst == worst else "n/a"
        lines.append(
            f"int8   {result.int8['path']} (max |dp| vs fp32 {result.int8['max_prob_diff']:.3f}, "
            f"largest val AUROC |change| {change}; gate {result.int8.get('gate', 'n/a')})"
        )
        lines.append(f"sha256 {result.int8['sha256']}")
    if result.run_id:
        version = f", registered version {result.model_version}" if result.model_version else ""
        lines.append(f"MLflow run {result.run_id}{version}")
    return "\n".join(lines)


def _slope_cell(r: dict[str, Any]) -> str:
    """A calibration slope for the summary table; "undef" where it does not exist."""
    return "undef" if r.get("calibration_note") else f"{r['calibration_slope']:.2f}"


def _risk_summary(result: Any) -> str:
    cv, te = result.cv, result.test
    ci = {n: f"{r['auroc_lo']:.3f}-{r['auroc_hi']:.3f}" for n, r in (("cv", cv), ("test", te))}
    return "\n".join(
        [
            result.table.summary(),
            f"{'':<6}{'AUROC':>8}{'95% CI':>16}{'AUPRC':>8}{'Brier':>8}{'slope':>8}{'ECE':>7}"
            f"{'sens':>7}{'spec':>7}",
            *[
                f"{name:<6}{r['auroc']:>8.3f}{ci[name]:>16}"
                f"{r['auprc']:>8.3f}{r['brier']:>8.3f}{_slope_cell(r):>8}{r['ece']:>7.3f}"
                f"{r['sensitivity']:>7.3f}{r['specificity']:>7.3f}"
                for name, r in (("cv", cv), ("test", te))
            ],
            *[
                f"{name}: calibration slope undefined: {r['calibration_note']}"
                for name, r in (("cv", cv), ("test", te))
                if r.get("calibration_note")
            ],
            f"threshold {te['threshold']:.3f}; ONNX parity max |dp| {result.parity:.1e}; "
            f"{result.seconds:.0f} s",
            f"ONNX   {result.onnx_path}",
            f"sha256 {result.sha256}",
            *(
                [f"MLflow run {result.run_id}, registered version {result.model_version}"]
                if result.run_id
                else []
            ),
        ]
    )
