"""Many `diagnostics worker` processes on one PostgreSQL queue, and the rule that sets each
one's ONNX Runtime threads from its share of the machine's cores.

The load test (`load` marker, in the default run): 4 worker processes, 1,000 small studies,
one worker SIGKILLed while it holds leases. Nothing is lost, nothing is scored twice, and the
dead worker's jobs are claimed again once their lease expires. It checks behaviour only:
throughput is measured by benchmarks/worker_scale.py, never asserted here.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from service_support import ingest_direct, pg_schema_url, serve_config
from sqlalchemy import func, select
from test_worker_processes import (
    _check_exactly_once,
    _count,
    _payloads,
    _wait_all_final,
    _worker,
    _write_config,
)

from diagnostics.serve.runner import OnnxModel
from diagnostics.serve.store import Audit, Job, Store
from diagnostics.serve.worker import available_cores, scoring_threads, threads_rule

FINAL_ACTIONS = ("study.scored", "study.qc_refused", "study.failed")


# --------------------------------------------------------------------------- the thread rule


def test_threads_are_the_cores_shared_by_the_workers_of_a_host():
    assert scoring_threads(0, 1, cores=16) == 0  # the only worker: ORT's own default
    assert threads_rule(0, 1, cores=16)[0] == 0
    assert scoring_threads(0, 4, cores=16) == 4
    assert scoring_threads(0, 3, cores=16) == 5  # rounded down: never more threads than cores
    assert scoring_threads(0, 4, cores=2) == 1  # more workers than cores: one thread each
    assert scoring_threads(6, 4, cores=16) == 6  # model.threads set: it wins
    assert threads_rule(0, 4, cores=2) == (1, "2 cores / 4 workers per host")
    assert threads_rule(3, 4, cores=2) == (3, "model.threads 3")


def test_cores_are_those_the_process_may_run_on(monkeypatch):
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this OS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # as under `taskset -c 0`
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert available_cores() == 1
    assert scoring_threads(0, 2) == 1


def test_the_worker_command_takes_its_share_of_the_cores(cxr_model, tmp_path, monkeypatch, caplog):
    """`diagnostics worker --workers-per-host N` (or its environment variable, or
    `worker.per_host`) sets the model's intra-op threads and logs the rule once, at start."""
    import logging

    from typer.testing import CliRunner

    from diagnostics.cli import app
    from diagnostics.serve import logs
    from diagnostics.serve import worker as worker_module

    started: list[object] = []
    monkeypatch.setattr(worker_module.Worker, "run", lambda self, stop: started.append(self))
    # the command's process-wide set-up, left out in this process: JSON logs, signal handlers
    monkeypatch.setattr(logs, "configure", lambda: None)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    caplog.set_level(logging.INFO, logger="diagnostics.serve.worker")
    cfg = serve_config(cxr_model, tmp_path / "serve", worker={"in_process": False})
    config = _write_config(cfg, tmp_path / "serve.yaml")
    cores = available_cores()
    runner = CliRunner()
    for args, env, per_host in (
        (["--workers-per-host", "2"], {}, 2),
        ([], {"DIAGNOSTICS_WORKERS_PER_HOST": "3"}, 3),
        (["--set", "worker.per_host=4"], {}, 4),
        (["--set", "model.threads=5", "--workers-per-host", "2"], {}, None),
    ):
        caplog.clear()
        result = runner.invoke(app, ["worker", "--config", str(config), *args], env=env)
        assert result.exit_code == 0, result.output
        rule = [r.getMessage() for r in caplog.records if "ONNX Runtime threads" in r.getMessage()]
        why = "model.threads 5" if per_host is None else f"/ {per_host} workers per host"
        assert len(rule) == 1 and why in rule[0], rule
        model = started[-1].scorer.model
        want = 5 if per_host is None else max(1, cores // per_host)
        assert model.threads == want
        assert model.session.get_session_options().intra_op_num_threads == want
        assert model.session.get_session_options().inter_op_num_threads == 1
        assert model.describe()["intra_op_threads"] == want  # /health/ready's model check


# --------------------------------------------------------------------------- the load test

N_JOBS = 1000
WORKERS = 4
# Longer than one batch of 8 takes on a slow, busy 2-core machine (a live worker's batch must
# never be taken back), short enough that the dead worker's jobs come back within the test.
LEASE_S = 10.0


@pytest.fixture
def pg_url():
    yield from pg_schema_url()


def _owned_running(store: Store, pid: int) -> list[Job]:
    """The jobs leased to the worker process `pid` (worker IDs are host-pid-random)."""
    with store.session() as s:
        return list(
            s.scalars(
                select(Job).where(Job.status == "running", Job.lease_owner.like(f"%-{pid}-%"))
            )
        )


def _scored_by(store: Store) -> dict[str, int]:
    with store.session() as s:
        rows = s.execute(
            select(Audit.actor, func.count())
            .where(Audit.action == "study.scored")
            .group_by(Audit.actor)
        ).all()
    return {str(actor): int(n) for actor, n in rows}


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until the kernel says the process is stopped (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.001)


def _job(store: Store, job_id: int) -> Job:
    with store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


@pytest.mark.load
def test_four_workers_a_thousand_jobs_one_killed(cxr_model, tmp_path, pg_url):
    cfg = serve_config(
        cxr_model,
        tmp_path / "serve",
        database_url=pg_url,
        worker={"in_process": False, "lease_s": LEASE_S, "per_host": WORKERS},
    )
    store = Store(pg_url, Path(cfg.data_dir) / "blobs")
    store.migrate()
    try:
        # Queued through the intake path itself (QC, blob, rows, job), without HTTP: 1,000
        # uploads would take longer than their scoring. Concurrent, as uploads are: most of
        # an upload's time is waiting for fsync.
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda data: ingest_direct(cfg, store, data), _payloads(N_JOBS)))
        config = _write_config(cfg, tmp_path / "serve.yaml")
        logs = [tmp_path / f"w{i}.log" for i in range(WORKERS)]
        procs = [_worker(config, log) for log in logs]
        victim = procs[0]
        try:
            # Mid-run: every worker has scored something, a fifth of the jobs are done. Then
            # stop the victim (SIGSTOP) at a moment it holds leases, and kill it there.
            deadline = time.monotonic() + 90
            while len(_scored_by(store)) < WORKERS or sum(_scored_by(store).values()) < N_JOBS // 5:
                assert time.monotonic() < deadline, [p.read_text()[-1500:] for p in logs]
                assert all(p.poll() is None for p in procs), [p.read_text()[-1500:] for p in logs]
                time.sleep(0.05)
            while True:
                victim.send_signal(signal.SIGSTOP)
                _wait_stopped(victim.pid)
                held = _owned_running(store, victim.pid)
                if held:
                    break
                victim.send_signal(signal.SIGCONT)
                time.sleep(0.005)
                assert time.monotonic() < deadline, "the victim never held a lease"
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            # A COMMIT the victim sent just before it stopped may still land (PostgreSQL finishes
            # it): what it held is what is still running under its lease a moment later.
            time.sleep(1.0)
            held = [j for j in held if _job(store, j.id).status == "running"]
            assert held, "the victim's last batch was committed as it died: no lease to re-claim"
            done_at_kill = _count(
                store,
                select(func.count()).select_from(Job).where(Job.status.in_(("scored", "failed"))),
            )
            assert done_at_kill < N_JOBS - len(held)  # work was left for the others
            _wait_all_final(store, N_JOBS, timeout=180)
        finally:
            if victim.poll() is None:  # an assertion fired while it was stopped
                victim.kill()
            for p in procs[1:]:
                p.terminate()
            for p in procs:
                p.wait(30)

        # Nothing lost, nothing scored twice: every job final, each scored study with one set
        # of findings and one `study.scored` audit row, and exactly one final audit row each.
        _check_exactly_once(store, N_JOBS, len(OnnxModel(cxr_model).labels))
        with store.session() as s:
            finals = dict(
                s.execute(
                    select(Audit.object_id, func.count())
                    .where(Audit.action.in_(FINAL_ACTIONS))
                    .group_by(Audit.object_id)
                ).all()
            )
            jobs = {j.id: j for j in s.scalars(select(Job))}
            reclaims = {
                a.object_id: a
                for a in s.scalars(select(Audit).where(Audit.action == "study.reclaimed"))
            }
            scored_actor = {
                a.object_id: a.actor
                for a in s.scalars(select(Audit).where(Audit.action == "study.scored"))
            }
        assert len(finals) == N_JOBS and set(finals.values()) == {1}
        statuses = {j.status for j in jobs.values()}
        assert statuses == {"scored"}, statuses  # fixture-like chests: all pass QC

        # The killed worker's leases: claimed again by another worker once they expired, and
        # scored there, on the second attempt.
        victim_actor = f"worker:{held[0].lease_owner}"
        for job in held:
            again = reclaims.get(job.study_id)
            assert again is not None, f"job {job.id} was never reclaimed"
            assert again.at >= job.lease_expires_at  # not before the lease ran out
            assert jobs[job.id].attempts == 2
            assert again.actor != victim_actor
            assert scored_actor[job.study_id] == again.actor
        # SKIP LOCKED: no other job was ever claimed by two workers.
        assert set(reclaims) == {j.study_id for j in held}
        assert {j.attempts for j in jobs.values() if j.id not in {h.id for h in held}} == {1}
        # Every worker took part, and each ran on its share of the cores.
        assert len(_scored_by(store)) == WORKERS
        want = scoring_threads(0, WORKERS)
        for log in logs:
            text = log.read_text()
            assert f"ONNX Runtime threads: intra-op {want}, inter-op 1" in text, text[-1500:]
            assert f"started: ONNX Runtime intra-op threads {want}" in text, text[-1500:]
    finally:
        store.close()
