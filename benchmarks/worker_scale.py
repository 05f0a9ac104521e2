"""Scoring throughput of `diagnostics worker` processes sharing one queue: N workers against one,
on the same queue size, in the same run.

    .venv/bin/python benchmarks/worker_scale.py                          # ResNet-18 at 224
    .venv/bin/python benchmarks/worker_scale.py --arch tiny_cnn --size 64 --jobs 1000
    .venv/bin/python benchmarks/worker_scale.py --model path/to/model.onnx --workers 4 --repeat 3

For each backend (PostgreSQL at --pg-url, in a fresh schema, and SQLite in WAL mode) and each
setting, a fresh queue of --jobs single-image studies (noise variants of a synthetic chest PNG,
--size pixels) is filled through the service's intake path (QC, fsynced blob, rows, job). The
queue is held (its jobs not yet available) while the workers start and load the model, then
released at once, and timed until every job is final. Settings:

- 1 worker: the baseline (`per_host` 1, so it takes every core);
- N workers, `per_host` N: the rule, max(1, cores // N) ONNX Runtime threads each;
- N workers, `per_host` 1 each: every worker believes it is alone and takes every core, as
  before the rule (N x cores threads).

Printed: jobs/s, and each setting's ratio to the 1-worker baseline of the same backend. The
worker processes are real `diagnostics worker` commands; nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import yaml
from sqlalchemy import func, select, update
from timing import noisy_pngs  # benchmarks/timing.py (scripts run from this folder)

from diagnostics.serve.config import ServeConfig
from diagnostics.serve.intake import ingest
from diagnostics.serve.store import Job, Store
from diagnostics.serve.store.tables import now
from diagnostics.serve.upload import ReceivedFile
from diagnostics.serve.worker import available_cores, scoring_threads

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
FINAL = ("scored", "failed_qc", "failed")


def _payloads(n: int, size: int, seed: int = 0) -> list[bytes]:
    """n distinct PNGs: noise variants of one synthetic chest."""
    from diagnostics.data.synthetic import SynthSpec, generate

    base = generate(1, SynthSpec(size=max(size, 64)), seed)[0][1].pixels
    return noisy_pngs(base, n, 0.005, seed)


def _pg_schema(url: str) -> tuple[str, str]:
    """(a URL whose search_path is a new schema, the schema), in the `test` database."""
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{url}?options=-csearch_path%3D{schema}", schema


def _pg_drop(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _libpq(url: str) -> str:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return f"host={u.host} port={u.port or 5432} dbname={u.database} user={u.username}"


def _fill(cfg: ServeConfig, store: Store, payloads: list[bytes]) -> None:
    """Queue one study per payload through the intake path, then hold them all."""

    def one(data: bytes) -> None:
        temp = store.blobs.temp_file()
        temp.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        ingest(
            cfg,
            store,
            ReceivedFile(temp, len(data), sha, data[:132], "x.png"),
            clinic="bench",
            actor="bench",
            source="http",
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, payloads))
    _set_available(store, now() + timedelta(days=1))


def _set_available(store: Store, at: object) -> None:
    store.write(lambda s: s.execute(update(Job).values(available_at=at)))


def _final(store: Store) -> int:
    with store.session() as s:
        return int(
            s.scalar(select(func.count()).select_from(Job).where(Job.status.in_(FINAL))) or 0
        )


def _outcomes(store: Store) -> dict[str, int]:
    with store.session() as s:
        rows = s.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {str(k): int(v) for k, v in rows}


def run_setting(
    model: Path, backend: str, pg_url: str, payloads: list[bytes], workers: int, per_host: int
) -> tuple[float, dict[str, int]]:
    """jobs/s of `workers` processes, each told `per_host`, on a fresh queue."""
    work = Path(tempfile.mkdtemp(prefix="worker_scale_"))
    schema = None
    url = ""
    if backend == "postgresql":
        url, schema = _pg_schema(pg_url)
    cfg = ServeConfig.model_validate(
        {
            "database_url": url,
            "data_dir": str(work / "serve"),
            "model": {"path": str(model), "device": "cpu", "batch_size": 8},
            "limits": {"disk_reserve_mb": 0, "max_queue": 1_000_000},
            "worker": {"in_process": False, "poll_s": 0.05, "lease_s": 300},
        }
    )
    store = Store(cfg.resolved_database_url(work), work / "serve" / "blobs")
    store.migrate()
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        _fill(cfg, store, payloads)
        config = work / "serve.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        env = {**os.environ, "DIAGNOSTICS_HOME": str(work), "PYTHONUNBUFFERED": "1"}
        for i in range(workers):
            log = open(work / f"w{i}.log", "wb")  # noqa: SIM115 (closed below)
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "diagnostics",
                        "worker",
                        "--config",
                        str(config),
                        "--workers-per-host",
                        str(per_host),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        deadline = time.monotonic() + 120
        while not all(b"started" in (work / f"w{i}.log").read_bytes() for i in range(workers)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError((work / "w0.log").read_text()[-3000:])
            time.sleep(0.1)
        _set_available(store, now())
        t0 = time.perf_counter()
        while _final(store) < len(payloads):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a worker stopped: " + (work / "w0.log").read_text()[-3000:])
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        return len(payloads) / wall, _outcomes(store)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        for log in logs:
            log.close()
        store.close()
        if schema is not None:
            _pg_drop(pg_url, schema)


def _pg_reachable(url: str) -> bool:
    try:
        import psycopg

        psycopg.connect(_libpq(url), connect_timeout=3).close()
        return True
    except Exception as exc:
        print(f"PostgreSQL at {url} not reachable ({type(exc).__name__}): skipped")
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an exported .onnx (default: random --arch)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224, help="model input and PNG size")
    parser.add_argument("--jobs", type=int, default=400, help="studies in each queue")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--backend", nargs="+", default=["postgresql", "sqlite"], choices=["postgresql", "sqlite"]
    )
    parser.add_argument("--pg-url", default=PG_URL)
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the median is printed")
    args = parser.parse_args()

    if args.model is None:
        from diagnostics.train.export import random_export

        args.model = random_export(
            args.arch, args.size, ["Pneumonia"], Path(tempfile.mkdtemp()) / f"{args.arch}.onnx"
        )
    payloads = _payloads(args.jobs, args.size)
    cores = available_cores()
    n = args.workers
    print(
        f"model {args.model.name}, {args.jobs} studies of {len(payloads[0]) / 1e3:.0f} kB, "
        f"{cores} cores"
    )

    def threads(per_host: int) -> str:
        t = scoring_threads(0, per_host)
        return f"{t} thread{'' if t == 1 else 's'}"

    settings = [
        (f"1 worker, {threads(1)}", 1, 1),
        (f"{n} workers, per_host {n}: {threads(n)} each", n, n),
        (f"{n} workers, per_host 1: {threads(1)} each", n, 1),
    ]
    for backend in args.backend:
        if backend == "postgresql" and not _pg_reachable(args.pg_url):
            continue
        print(f"\n{backend}" + (f" (median of {args.repeat} rounds)" if args.repeat > 1 else ""))
        rates: dict[str, list[float]] = {name: [] for name, _, _ in settings}
        outcomes: dict[str, dict[str, int]] = {}
        for _ in range(args.repeat):  # rounds interleave the settings: drift hits all alike
            for name, workers, per_host in settings:
                rate, outcomes[name] = run_setting(
                    args.model, backend, args.pg_url, payloads, workers, per_host
                )
                rates[name].append(rate)
        base = statistics.median(rates[settings[0][0]])
        for name, _, _ in settings:
            rate = statistics.median(rates[name])
            print(f"  {name:<40} {rate:7.1f} jobs/s  {rate / base:5.2f}x  {outcomes[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
