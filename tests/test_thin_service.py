"""The upload -> store -> queue -> score -> result path, kept thin: how many transactions an
upload costs, group-committed access rows, one commit per scored batch, fsyncs per blob, the
worker woken by an upload, and the long-poll (GET /v1/studies/{id}?wait=)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from typing import Any

import pytest
from service_support import dicom_bytes, running_service, serve_config, synth_pixels
from sqlalchemy import event, select

from diagnostics.serve.store import Audit, LeaseLost, Store, StoreBusy, StoreFull
from diagnostics.serve.store.blobs import BlobStore


@pytest.fixture()
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "blobs")
    s.migrate()
    yield s
    s.close()


def _count_begins(engine: Any, skip_thread: str | None = None) -> list[str]:
    """Every transaction begun on `engine` from now on (its thread's name), but `skip_thread`'s."""
    seen: list[str] = []

    def on_begin(_conn: Any) -> None:
        name = threading.current_thread().name
        if name != skip_thread:
            seen.append(name)

    event.listen(engine, "begin", on_begin)
    return seen


# --------------------------------------------------------------------------- blobs


def test_blob_commit_fsyncs_parent_folders_once_per_process(tmp_path):
    blobs = BlobStore(tmp_path / "b")
    sha = "ab" * 32
    other = "abab" + "e" * 60  # the same two folders
    for digest in (sha, other):
        t = blobs.temp_file()
        t.write_bytes(digest.encode())
        blobs.commit(t, digest)
    # first: the file's folder, then the entries of its two new folders; second: its folder
    assert blobs.dir_fsyncs == 3 + 1
    assert blobs.read(sha) == sha.encode() and blobs.read(other) == other.encode()
    again = BlobStore(tmp_path / "b")  # a new process syncs the folders above once more
    t = again.temp_file()
    t.write_bytes(b"x")
    again.commit(t, "abab" + "f" * 60)
    assert again.dir_fsyncs == 3


# --------------------------------------------------------------------------- audit group commit


def test_concurrent_access_rows_share_one_transaction(store):
    group = store._audit_group()
    begins = _count_begins(store.write_engine)
    threads = [
        threading.Thread(target=store.log_access, args=(f"k{i}", "study.read", "study", f"s{i}"))
        for i in range(8)
    ]
    with group.committing:  # a commit in flight: the 8 rows queue up behind it
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(group.pending) < 8 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(group.pending) == 8
    for t in threads:
        t.join(10)
    assert len(begins) == 1 and group.batches == 1  # one leader wrote all eight
    rows = [r for r in store.audit_rows() if r.action == "study.read"]
    assert sorted(r.object_id for r in rows) == [f"s{i}" for i in range(8)]
    store.log_access("k", "study.read", "study", "alone")  # alone: its own transaction
    assert len(begins) == 2


def test_access_row_errors_reach_each_caller(store, monkeypatch, caplog):
    def full(_fn: Any) -> Any:
        raise StoreFull("the database is full")

    monkeypatch.setattr(store, "write", full)
    store.log_access("k", "study.read", "study", "s1")  # logged, not raised
    assert "audit row not written" in caplog.text

    def busy(_fn: Any) -> Any:
        raise StoreBusy("the database is busy")

    monkeypatch.setattr(store, "write", busy)
    with pytest.raises(StoreBusy):
        store.log_access("k", "study.read", "study", "s2")
    assert not store._audit_group().pending


# --------------------------------------------------------------------------- one commit per batch


def _claimed(store: Store, n: int) -> list[Any]:
    for i in range(n):
        store.create_study(
            clinic="c", actor="t", sha256=hashlib.sha256(b"%d" % i).hexdigest(), size=1, fmt="png"
        )
    return store.claim("w1", 60.0, limit=n)


def _outcome(job: Any, owner: str = "w1") -> dict[str, Any]:
    finding = {
        "label": "Pneumonia",
        "probability": 0.7,
        "threshold": 0.5,
        "positive": True,
        "model_sha256": "0" * 64,
        "model_version": "1",
        "preprocess_version": "1",
        "provider": "CPUExecutionProvider",
    }
    return {
        "job_id": job.id,
        "owner": owner,
        "attempt": job.attempts,
        "status": "scored",
        "result": {"ok": True},
        "findings": [finding],
    }


def test_complete_many_is_one_transaction_fenced_per_job(store):
    claimed = _claimed(store, 3)
    assert len(claimed) == 3
    lost_job = claimed[1][0]

    def steal(s: Any) -> None:  # another worker took the second job's lease
        from diagnostics.serve.store import Job

        s.get_one(Job, lost_job.id).lease_owner = "w2"

    store.write(steal)
    bad = {**_outcome(claimed[2][0]), "findings": [{"label": "x", "probability": float("nan")}]}
    bad["findings"][0]["threshold"] = 0.5
    begins = _count_begins(store.write_engine)
    errors = store.complete_many([_outcome(claimed[0][0]), _outcome(lost_job), bad])
    assert len(begins) == 1
    assert errors[0] is None
    assert isinstance(errors[1], LeaseLost) and isinstance(errors[2], ValueError)
    statuses = [store.get_study(study.id).status for _, study in claimed]
    assert statuses == ["scored", "running", "running"]  # nothing of the others was written
    view = store.study_view(claimed[0][1].id)
    assert view is not None and view["findings"][0]["probability"] == 0.7
    with store.session() as s:
        scored = s.scalars(select(Audit).where(Audit.action == "study.scored")).all()
    assert [a.object_id for a in scored] == [claimed[0][1].id]


# --------------------------------------------------------------------------- the wake-up


def test_worker_wakes_a_waiting_coroutine_from_its_thread(store):
    from diagnostics.serve.worker import Worker

    worker = Worker(store, scorer=object())

    async def main() -> bool:
        ev = worker.watch("s1")
        threading.Timer(0.05, worker._notify, args=("s1",)).start()
        try:
            await asyncio.wait_for(ev.wait(), 5)
            return True
        finally:
            worker.unwatch("s1", ev)

    assert asyncio.run(main())
    assert worker._waiters == {}


# --------------------------------------------------------------------------- the real service


@pytest.fixture(scope="module")
def slow_poll_service(cxr_model, tmp_path_factory):
    """A worker that would poll only every 30 s: anything faster is the upload's wake-up."""
    cfg = serve_config(
        cxr_model, tmp_path_factory.mktemp("thin") / "serve", worker={"poll_s": 30.0}
    )
    with running_service(cfg) as svc:
        time.sleep(0.3)  # the worker's first (empty) claim, then its 30 s wait
        yield svc


def test_an_upload_is_one_write_transaction(slow_poll_service):
    svc = slow_poll_service
    (px,) = synth_pixels(1, seed=901)
    data = dicom_bytes(px)
    writes = _count_begins(svc.store.write_engine, skip_thread="scoring-worker")
    reads = _count_begins(svc.store.engine, skip_thread="scoring-worker")
    r = svc.upload(data)
    assert r.status_code == 202, r.text
    # the study, instance, job and audit rows (and the clinic's, once) in one transaction;
    # reads: the key, the queue's depth, the de-duplication check
    assert len(writes) == 1, writes
    assert len(reads) <= 3, reads


def test_upload_wakes_the_worker_and_long_poll_answers_when_final(slow_poll_service):
    svc = slow_poll_service
    (px,) = synth_pixels(1, seed=902)
    t0 = time.monotonic()
    r = svc.upload(dicom_bytes(px))
    assert r.status_code == 202, r.text
    doc = svc.get(f"/v1/studies/{r.json()['id']}?wait=25").json()
    assert doc["status"] == "scored", doc  # one request, not a poll loop
    assert time.monotonic() - t0 < 20  # the worker polls every 30 s: the upload woke it
    assert doc["findings"]


def test_long_poll_is_bounded(slow_poll_service):
    svc = slow_poll_service
    (px,) = synth_pixels(1, seed=903)
    import httpx

    r = httpx.post(
        f"{svc.url}/v1/studies",
        params={"complete": "false"},
        files={"file": ("a.dcm", dicom_bytes(px), "application/dicom")},
        headers=svc.headers(svc.submitter),
        timeout=60,
    )
    assert r.status_code == 202, r.text
    sid = r.json()["id"]
    t0 = time.monotonic()
    doc = svc.get(f"/v1/studies/{sid}?wait=0.5").json()
    assert doc["status"] == "received"  # still open: answered when the wait ran out
    assert 0.4 < time.monotonic() - t0 < 5
    assert svc.get(f"/v1/studies/{sid}?wait=31").status_code == 422  # at most 30 s
    t0 = time.monotonic()  # another clinic's study: 404 at once, no waiting
    assert svc.get(f"/v1/studies/{sid}?wait=10", key=svc.other_clinic).status_code == 404
    assert time.monotonic() - t0 < 3
