"""`diagnostics worker` as real processes: SIGKILL while scoring, then restart; two workers on
PostgreSQL. Every accepted study must end scored or failed, none lost, none scored twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from service_support import pg_schema_url, png_bytes, running_service, serve_config, synth_pixels
from sqlalchemy import func, select

from diagnostics.serve.store import Audit, FindingRow, Job


def _payloads(n: int) -> list[bytes]:
    """n distinct synthetic chests like those the fixture model was trained on (noise variants
    of a few, so that the bytes differ)."""
    base = synth_pixels(4, seed=900)
    rng = np.random.default_rng(0)
    return [
        png_bytes(np.clip(base[i % 4] + rng.normal(0, 0.005, base[0].shape), 0, 1))
        for i in range(n)
    ]


def _write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def _worker(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "diagnostics", "worker", "--config", str(config)],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _count(store, stmt) -> int:
    with store.session() as s:
        return int(s.scalar(stmt) or 0)


def _wait_all_final(store, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        final = _count(
            store,
            select(func.count())
            .select_from(Job)
            .where(Job.status.in_(("scored", "failed_qc", "failed"))),
        )
        if final == n:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{final} of {n} studies final")


def _check_exactly_once(store, n: int, labels: int) -> None:
    with store.session() as s:
        jobs = list(s.scalars(select(Job)))
        assert len(jobs) == n
        assert {j.status for j in jobs} <= {"scored", "failed"}
        for j in jobs:
            findings = s.scalar(
                select(func.count())
                .select_from(FindingRow)
                .where(FindingRow.study_id == j.study_id)
            )
            assert findings == (labels if j.status == "scored" else 0)
            finished = s.scalar(
                select(func.count())
                .select_from(Audit)
                .where(Audit.object_id == j.study_id, Audit.action == "study.scored")
            )
            assert finished == (1 if j.status == "scored" else 0)


def test_sigkill_while_scoring_then_restart_loses_nothing(cxr_model, tmp_path):
    n = 48
    cfg = serve_config(cxr_model, tmp_path / "serve", worker={"in_process": False, "lease_s": 2.0})
    with running_service(cfg) as svc:
        for data in _payloads(n):
            assert svc.upload(data, filename="x.png", content_type="image/png").status_code == 202
        store = svc.store
        config = _write_config(cfg, tmp_path / "serve.yaml")
        proc = _worker(config, tmp_path / "worker1.log")
        running = 0
        deadline = time.monotonic() + 60
        while running == 0 and time.monotonic() < deadline and proc.poll() is None:
            running = _count(
                store, select(func.count()).select_from(Job).where(Job.status == "running")
            )
            if running == 0:
                time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert running > 0, (tmp_path / "worker1.log").read_text()[-2000:]
        stranded = _count(
            store, select(func.count()).select_from(Job).where(Job.status == "running")
        )
        assert stranded > 0  # killed mid-batch: leases left behind
        proc = _worker(config, tmp_path / "worker2.log")
        try:
            _wait_all_final(store, n)
        finally:
            proc.terminate()
            proc.wait(10)
        _check_exactly_once(store, n, len(svc.app.state.holder.model.labels))
        with store.session() as s:
            reclaimed = s.scalar(
                select(func.count()).select_from(Audit).where(Audit.action == "study.reclaimed")
            )
            assert reclaimed >= stranded
            assert s.scalar(select(func.max(Job.attempts))) == 2


@pytest.fixture
def pg_url():
    yield from pg_schema_url()


def test_two_workers_on_postgresql_never_score_a_job_twice(cxr_model, tmp_path, pg_url):
    n = 64
    cfg = serve_config(
        cxr_model, tmp_path / "serve", database_url=pg_url, worker={"in_process": False}
    )
    with running_service(cfg) as svc:
        for data in _payloads(n):
            assert svc.upload(data, filename="x.png", content_type="image/png").status_code == 202
        config = _write_config(cfg, tmp_path / "serve.yaml")
        procs = [_worker(config, tmp_path / f"w{i}.log") for i in range(2)]
        try:
            _wait_all_final(svc.store, n)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
        _check_exactly_once(svc.store, n, len(svc.app.state.holder.model.labels))
        with svc.store.session() as s:
            assert s.scalar(select(func.max(Job.attempts))) == 1  # no job claimed twice
            owners = {
                a.actor for a in s.scalars(select(Audit).where(Audit.action == "study.scored"))
            }
        assert 1 <= len(owners) <= 2
