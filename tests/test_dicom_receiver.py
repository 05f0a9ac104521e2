"""The DICOM receiver: a real pynetdicom SCU against the real receiver on loopback, storing
into a real SQLite store."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, shared
from service_support import dicom_bytes, synth_pixels
from sqlalchemy import func, select

pytest.importorskip("pynetdicom")

AE_TITLE = "DIAGTEST"
CALLER = "MODALITY1"
CLINIC = "clinic-a"
CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _cfg(tmp_path: Path, **dicom: Any) -> Any:
    from diagnostics.serve.config import ServeConfig

    limits = {"disk_reserve_mb": dicom.pop("disk_reserve_mb", 0)}
    if "max_upload_mb" in dicom:
        limits["max_upload_mb"] = dicom.pop("max_upload_mb")
    section = {
        "ae_title": AE_TITLE,
        "port": 0,
        "network_timeout_s": 10,
        "callers": {CALLER: {"clinic": CLINIC}},
        **dicom,
    }
    return ServeConfig.model_validate(
        {
            "data_dir": str(tmp_path / "data"),
            "database_url": f"sqlite:///{tmp_path / 'data' / 'service.db'}",
            "limits": limits,
            "dicom": section,
        }
    )


def _store(cfg: Any) -> Any:
    from diagnostics.serve.store import Store

    data = Path(cfg.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    store = Store(cfg.database_url, data / "blobs")
    store.migrate()
    return store


@contextmanager
def _receiver(tmp_path: Path, **dicom: Any) -> Iterator[Any]:
    from diagnostics.serve.dicom.receiver import DicomReceiver

    cfg = _cfg(tmp_path, **dicom)
    store = _store(cfg)
    woken: list[int] = []
    receiver = DicomReceiver(cfg, store, on_stored=lambda: woken.append(1))
    receiver.start()
    receiver.woken = woken  # type: ignore[attr-defined]
    try:
        yield receiver
    finally:
        receiver.stop()
        receiver.stop()  # idempotent
        store.close()


def _dataset(seed: int = 0, **changes: Any) -> Any:
    from pydicom import dcmread

    pixels = synth_pixels(1, seed=100 + seed, size=64)[0]
    return dcmread(io.BytesIO(dicom_bytes(pixels, uid_seed=f"receiver-{seed}", **changes)))


@contextmanager
def _association(
    port: int, calling: str = CALLER, contexts: tuple[str, ...] = (CR,), called: str = AE_TITLE
) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class in (VERIFICATION, *contexts):
        ae.add_requested_context(sop_class, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _instances(store: Any) -> list[Any]:
    from diagnostics.serve.store.tables import Instance

    with store.session() as s:
        return list(s.scalars(select(Instance)))


def _count(store: Any) -> int:
    from diagnostics.serve.store.tables import Instance

    with store.session() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def test_echo_for_a_known_caller_and_rejection_of_an_unknown_one(tmp_path: Path) -> None:
    with _receiver(tmp_path) as rx:
        with _association(rx.port) as assoc:
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
        with _association(rx.port, calling="STRANGER") as assoc:
            assert not assoc.is_established
            assert assoc.is_rejected
            rj = assoc.acceptor.primitive
            # rejected-permanent, by the service user, calling AE title not recognised
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
        with _association(rx.port, called="SOMEONEELSE") as assoc:
            assert assoc.is_rejected
            assert assoc.acceptor.primitive.diagnostic == 0x07  # called AE title not recognised


def test_store_then_resend_is_one_instance_of_the_callers_clinic(tmp_path: Path) -> None:
    ds = _dataset(1)
    with _receiver(tmp_path) as rx:
        with _association(rx.port) as assoc:
            assert assoc.send_c_store(ds).Status == 0x0000
            rows = _instances(rx.store)
            assert len(rows) == 1
            row = rows[0]
            assert row.clinic_id == CLINIC
            assert row.source == "dicom"
            assert row.sop_instance_uid == ds.SOPInstanceUID
            blob = rx.store.blobs.path(row.content_sha256)
            assert blob.is_file()
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == row.content_sha256
            assert blob.read_bytes()[128:132] == b"DICM"  # stored as a Part 10 file
            # the same SOP Instance UID again: acknowledged, not stored twice
            assert assoc.send_c_store(ds).Status == 0x0000
        assert _count(rx.store) == 1
        assert len(rx.woken) == 1  # the worker is woken for the new instance only
        assert not list(rx.store.blobs.tmp.glob("*.part"))


def test_real_cr_file_is_stored(tmp_path: Path) -> None:
    from pydicom import dcmread

    ds = dcmread(shared("dicom", "pydicom-data_RG1_UNCR.dcm"))
    with _receiver(tmp_path) as rx, _association(rx.port) as assoc:
        assert assoc.send_c_store(ds).Status == 0x0000
        (row,) = _instances(rx.store)
        assert row.sop_instance_uid == ds.SOPInstanceUID
        assert rx.store.blobs.path(row.content_sha256).is_file()


def test_unsupported_sop_class_is_refused_at_association_time(tmp_path: Path) -> None:
    ct = _dataset(2, SOPClassUID=CT, Modality="CT")
    with _receiver(tmp_path) as rx:
        with _association(rx.port, contexts=(CT,)) as assoc:  # Verification and CT
            assert assoc.is_established
            assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [VERIFICATION]
            assert CT in [cx.abstract_syntax for cx in assoc.rejected_contexts]
            with pytest.raises(ValueError):  # no accepted context to send it on
                assoc.send_c_store(ct)

        from pynetdicom import AE

        ae = AE(ae_title=CALLER)
        ae.acse_timeout = ae.network_timeout = 10
        ae.add_requested_context(CT, EXPLICIT_LE)
        assoc = ae.associate("127.0.0.1", rx.port, ae_title=AE_TITLE)
        assert not assoc.is_established  # CT alone: no accepted context at all
        assert _count(rx.store) == 0


@pytest.mark.parametrize(
    ("limit", "code"),
    [
        ({"disk_reserve_mb": 1e12}, "insufficient_storage"),  # free disk below the reserve
        ({"max_upload_mb": 0.001}, "instance_too_large"),  # over the size cap
    ],
)
def test_out_of_resources_stores_nothing(
    tmp_path: Path, limit: dict[str, float], code: str
) -> None:
    with _receiver(tmp_path, **limit) as rx, _association(rx.port) as assoc:
        status = assoc.send_c_store(_dataset(3))
        assert status.Status == 0xA700
        assert status.ErrorComment == code
        assert _count(rx.store) == 0
        assert not list(rx.store.blobs.tmp.glob("*.part"))
        assert not [p for p in rx.store.blobs.root.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"Modality": "MR"}, "modality_not_supported"),
        ({"PixelData": None}, None),
    ],
)
def test_header_qc_refusal_is_cannot_understand(
    tmp_path: Path, changes: dict[str, Any], code: str | None
) -> None:
    with _receiver(tmp_path) as rx, _association(rx.port) as assoc:
        status = assoc.send_c_store(_dataset(4, **changes))
        assert 0xC000 <= status.Status <= 0xCFFF
        comment = str(status.ErrorComment)
        assert comment and comment.isascii() and len(comment) <= 64
        if code is not None:
            assert comment == code
        assert _count(rx.store) == 0
        assert not list(rx.store.blobs.tmp.glob("*.part"))


def test_second_association_is_rejected_over_the_limit(tmp_path: Path) -> None:
    with _receiver(tmp_path, max_associations=1) as rx:
        with _association(rx.port) as first:
            assert first.is_established
            with _association(rx.port) as second:
                assert not second.is_established
                assert second.is_rejected
                rj = second.acceptor.primitive
                assert (rj.result_source, rj.diagnostic) == (0x03, 0x02)  # local limit exceeded
            assert first.send_c_echo().Status == 0x0000
        time.sleep(0.2)  # the first association's thread ends after its release
        with _association(rx.port) as third:
            assert third.is_established


def _receive_command() -> list[str]:
    """`diagnostics dicom receive`, or the sub-app itself while it is not registered."""
    from diagnostics.cli import app

    if any(group.name == "dicom" for group in app.registered_groups):
        return [sys.executable, "-m", "diagnostics", "dicom", "receive"]
    return [sys.executable, "-c", "from diagnostics.cli.dicom import app; app()", "receive"]


def test_killed_receiver_loses_nothing_it_acknowledged(tmp_path: Path) -> None:
    """`dicom receive` in its own process, SIGKILLed while an SCU streams instances to it:
    every instance answered 0x0000 is in the store, with its blob intact."""
    cfg_file = tmp_path / "serve.yaml"
    data = tmp_path / "data"
    cfg_file.write_text(
        f"data_dir: {data}\n"
        f"limits: {{disk_reserve_mb: 0}}\n"
        f"dicom:\n  ae_title: {AE_TITLE}\n  port: 0\n  network_timeout_s: 10\n"
        f"  callers: {{{CALLER}: {{clinic: {CLINIC}}}}}\n"
    )
    env = {**os.environ, "DIAGNOSTICS_HOME": str(tmp_path / "home"), "RUST_BACKTRACE": "0"}
    proc = subprocess.Popen(
        [*_receive_command(), "--config", str(cfg_file)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "dicom receiver DIAGTEST listening on 127.0.0.1:PORT"
        assert "listening on" in line, line
        port = int(line.rsplit(":", 1)[1])
        datasets = [_dataset(10 + i) for i in range(40)]
        acked: list[str] = []
        done = threading.Event()

        def send() -> None:
            try:
                with _association(port) as assoc:
                    for ds in datasets:
                        status = assoc.send_c_store(ds)
                        if "Status" not in status:  # aborted: no answer
                            break
                        if status.Status == 0x0000:
                            acked.append(ds.SOPInstanceUID)
            except Exception:
                pass
            finally:
                done.set()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        deadline = time.monotonic() + 30
        while len(acked) < 5 and not done.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        sender.join(15)
        assert not sender.is_alive()
        assert 5 <= len(acked) < len(datasets), "the kill did not land mid-stream"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()

    from diagnostics.serve.store import Store
    from diagnostics.serve.store.tables import Instance

    store = Store(f"sqlite:///{(data / 'service.db').resolve()}", data / "blobs")
    try:
        with store.session() as s:
            rows = {
                r.sop_instance_uid: r
                for r in s.scalars(select(Instance).where(Instance.clinic_id == CLINIC))
            }
        for uid in acked:
            row = rows.get(uid)
            assert row is not None, "an acknowledged instance has no row"
            blob = store.blobs.path(row.content_sha256)
            assert blob.is_file(), "an acknowledged instance has no blob"
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == row.content_sha256
    finally:
        store.close()


def test_concurrent_associations_store_everything(tmp_path: Path) -> None:
    """Several senders at once (one association thread each, one SQLite writer)."""
    batches = [[_dataset(100 + 10 * k + i) for i in range(4)] for k in range(3)]
    statuses: list[int] = []

    def send(port: int, batch: list[Any]) -> None:
        with _association(port) as assoc:
            statuses.extend(int(assoc.send_c_store(ds).Status) for ds in batch)

    with _receiver(tmp_path) as rx:
        threads = [threading.Thread(target=send, args=(rx.port, b)) for b in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert statuses == [0x0000] * 12
        assert _count(rx.store) == 12
        assert len(rx.woken) == 12
