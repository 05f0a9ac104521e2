"""DICOM results back to the PACS: the outbox and the exporter, against a real pynetdicom
storage SCP (and a real HTTP server for STOW-RS) on loopback, with a real SQLite store and a
study received as DICOM and scored by the real worker and model."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from service_support import dicom_bytes, synth_pixels

pytest.importorskip("pynetdicom")

CLINIC = "clinic-a"
PACS_AE = "TESTPACS"
SR = "1.2.840.10008.5.1.4.1.1.88.33"
SC = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
# What the source images say about the patient and the study (all of it fictitious)
PATIENT = {
    "PatientName": "Tran^Thi Mai",
    "PatientID": "BN-2024-000731",
    "PatientBirthDate": "20190304",
    "PatientSex": "F",
    "AccessionNumber": "ACC77120",
    "StudyID": "S4411",
    "StudyDate": "20240611",
    "StudyTime": "101500",
    "ReferringPhysicianName": "Le^Van Binh",
}
# Attributes that say who the patient is, or which study: what goes out must equal the source
IDENTIFYING = {
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyInstanceUID",
    "ReferringPhysicianName",
    "InstitutionName",
    "OtherPatientIDs",
    "IssuerOfPatientID",
}


# --------------------------------------------------------------------------- peers


class StorageSCP:
    """A real pynetdicom storage SCP for SR and SC that keeps what it receives and answers
    `status` (settable)."""

    def __init__(self, status: int = 0x0000, port: int = 0) -> None:
        from pynetdicom import AE, evt

        self.status = status
        self.received: list[Dataset] = []
        self.calls = 0
        ae = AE(ae_title=PACS_AE)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        for sop_class in (SR, SC):
            ae.add_supported_context(sop_class, [EXPLICIT_LE, IMPLICIT_LE])
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Any) -> int:
        self.calls += 1
        if self.status in (0x0000, 0xB000):
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


class StowServer:
    """A real HTTP server taking STOW-RS POSTs: keeps each body, answers `status`."""

    def __init__(self, status: int = 200) -> None:
        outer = self
        self.status = status
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((self.path, dict(self.headers), body))
                doc = json.dumps({"00081199": {"vr": "SQ", "Value": [{}]}}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(doc)))
                self.end_headers()
                self.wfile.write(doc)

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- the study


def _config(data_dir: Path, dest: dict[str, Any] | None = None, **export: Any) -> Any:
    from diagnostics.serve.config import ServeConfig

    return ServeConfig.model_validate(
        {
            "data_dir": str(data_dir),
            "database_url": f"sqlite:///{data_dir / 'service.db'}",
            "studies": {"quiet_period_s": 0},
            "dicom": {
                "ae_title": "DIAGOUT",
                "destinations": {CLINIC: dest or {}},
                "export": {"backoff_s": 0, "max_attempts": 3, "timeout_s": 5, **export},
            },
        }
    )


def _receive(cfg: Any, store: Any, data: bytes) -> str:
    """One image through the intake every way in shares, as the DICOM receiver sends it."""
    from diagnostics.serve.intake import ingest
    from diagnostics.serve.upload import ReceivedFile

    temp = store.blobs.temp_file()
    temp.write_bytes(data)
    got = ReceivedFile(temp, len(data), hashlib.sha256(data).hexdigest(), data[:512], "")
    return ingest(cfg, store, got, clinic=CLINIC, actor="dicom:MODALITY", source="dicom").study.id


@pytest.fixture(scope="module")
def template(cxr_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A data folder holding one scored study of two PA images (received as DICOM, scored
    by the real worker and model), with one finding positive through a site profile."""
    from diagnostics.serve.qc import QCConfig
    from diagnostics.serve.runner import OnnxModel, Scorer
    from diagnostics.serve.store import Store
    from diagnostics.serve.worker import Worker

    data_dir = tmp_path_factory.mktemp("export") / "data"
    cfg = _config(data_dir)
    store = Store(cfg.database_url, data_dir / "blobs")
    store.migrate()
    model = OnnxModel(cxr_model)
    label = model.labels[0]
    store.save_profile(  # the site calls `label` positive on anything: a heatmap for sure
        model_sha256=model.sha256,
        site=CLINIC,
        temperatures={label: 1.0},
        thresholds={label: 0.0},
        policy="sensitivity>=0.99",
        evidence={label: {"n": 100}},
        created_by="test",
    )
    study_uid = generate_uid(entropy_srcs=["export-test", "study"])
    sources = [
        dicom_bytes(
            px,
            f"export-test:{i}",
            StudyInstanceUID=study_uid,
            InstanceNumber=i + 1,
            ViewPosition="PA",
            **PATIENT,
        )
        for i, px in enumerate(synth_pixels(2, seed=4100))
    ]
    study_ids = {_receive(cfg, store, data) for data in sources}
    assert len(study_ids) == 1
    (study_id,) = study_ids
    scorer = Scorer(model, QCConfig(ood=False), heatmap_dir=data_dir / "heatmaps")
    worker = Worker(store, scorer, owner="test-worker")
    assert worker.run_once() == 1
    view = store.study_view(study_id)
    assert view["status"] == "scored", view
    assert any(f["positive"] for f in view["findings"])
    store.close()  # the database checkpointed: each test copies the folder
    return {
        "dir": data_dir,
        "study": study_id,
        "sources": [dcmread(io.BytesIO(d), stop_before_pixels=True) for d in sources],
        "label": label,
    }


@pytest.fixture
def env(template: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A private copy of the template's data folder, its store open."""
    from diagnostics.serve.store import Store

    data_dir = tmp_path / "data"
    shutil.copytree(template["dir"], data_dir)
    store = Store(f"sqlite:///{data_dir / 'service.db'}", data_dir / "blobs")
    store.migrate()
    try:
        yield {**template, "dir": data_dir, "store": store}
    finally:
        store.close()


def _exporter(env: dict[str, Any], dest: dict[str, Any], **export: Any) -> Any:
    from diagnostics.serve.dicom.export import Exporter

    return Exporter(_config(env["dir"], dest, **export), env["store"], env["dir"])


def _cstore(port: int) -> dict[str, Any]:
    return {"ae_title": PACS_AE, "host": "127.0.0.1", "port": port}


def _states(store: Any) -> list[tuple[str, str, str, int]]:
    return sorted((i.kind, i.route, i.state, i.attempts) for i in store.outbox_items())


def _due_again(s: Any) -> None:
    """Every outbox row pending and due, as if never sent (to send it again)."""
    from diagnostics.serve.store import now
    from diagnostics.serve.store.tables import OutboxItem

    for item in s.query(OutboxItem):
        item.state, item.attempts, item.next_attempt_at = "pending", 0, now()


def _same_patient(sent: Dataset, source: Dataset) -> None:
    """No patient or study attribute of `sent` differs from the source's."""
    checked = 0
    for elem in sent:
        keyword = elem.keyword or ""
        if keyword.startswith("Patient") or keyword in IDENTIFYING:
            theirs = source.get(keyword)
            assert (elem.value or None) == (theirs or None) or str(elem.value) == str(theirs), (
                keyword
            )
            checked += 1
    assert checked >= len(PATIENT)


# --------------------------------------------------------------------------- tests


@pytest.fixture(autouse=True)
def _library_log_levels() -> Iterator[None]:
    """The exporter turns pynetdicom's and highdicom's chatter down; other tests keep theirs."""
    loggers = [logging.getLogger(name) for name in ("pynetdicom", "highdicom")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def test_ai_sr_and_heatmap_arrive_once_with_only_the_sources_patient_data(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # every library's INFO lines, and ours at DEBUG
    caplog.set_level(logging.DEBUG, logger="diagnostics")
    scp = StorageSCP()
    try:
        exporter = _exporter(env, _cstore(scp.port))
        added = exporter.plan_once()
        assert added >= 2  # the AI SR and at least one heatmap
        assert exporter.plan_once() == 0  # planning twice enqueues nothing twice
        assert exporter.send_once() == added
        assert exporter.send_once() == 0 and exporter.plan_once() == 0
    finally:
        scp.stop()
    assert {s for _, _, s, _ in _states(env["store"])} == {"sent"}
    by_class: dict[str, list[Dataset]] = {}
    for ds in scp.received:
        by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
    (sr,) = by_class[SR]
    view = env["store"].study_view(env["study"])
    positives = [f for f in view["findings"] if f["positive"]]
    assert len(by_class[SC]) == len(positives)
    sources = env["sources"]
    source_uids = {str(s.SOPInstanceUID) for s in sources}
    # the AI SR: unreviewed, of the sources' study, referencing both images
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("PARTIAL", "UNVERIFIED")
    evidence = {
        str(i.ReferencedSOPInstanceUID)
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for series in s.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert evidence == source_uids
    # each heatmap: RGB, at least 512 px, on the image where its finding scored highest
    for sc in by_class[SC]:
        assert sc.PhotometricInterpretation == "RGB" and min(sc.Rows, sc.Columns) >= 512
        (ref,) = sc.SourceImageSequence
        assert str(ref.ReferencedSOPInstanceUID) in source_uids
    top = max(positives[0]["images"], key=lambda p: p["probability"])
    instances = {i.id: i for i in env["store"].study_instances(env["study"])}
    assert str(by_class[SC][0].SourceImageSequence[0].ReferencedSOPInstanceUID) == (
        instances[top["instance_id"]].sop_instance_uid
    )
    for ds in scp.received:
        _same_patient(ds, sources[0])
    # nothing about the patient, and no UID, in the service's logs
    logged = caplog.text
    for secret in [*PATIENT.values(), *source_uids, str(sr.SOPInstanceUID)]:
        if len(secret) > 2:
            assert secret not in logged


def test_destination_down_retries_with_backoff_then_stops_failed_until_resent(
    env: dict[str, Any],
) -> None:
    store = env["store"]
    down = _exporter(env, _cstore(closed_port()))
    rows = down.plan_once()
    for attempt in (1, 2):
        assert down.send_once() == rows
        assert {(s, a) for _, _, s, a in _states(store)} == {("pending", attempt)}
    assert down.send_once() == rows
    assert {(s, a) for _, _, s, a in _states(store)} == {("failed", 3)}  # max_attempts
    for _ in range(3):  # never more
        assert down.send_once() == 0
    assert {(s, a) for _, _, s, a in _states(store)} == {("failed", 3)}
    (item, *_) = store.outbox_items()
    assert "no association" in item.last_error
    actions = [a.action for a in store.audit_rows(env["study"])]
    assert actions.count("outbox.failed") == rows and actions.count("outbox.retry") == 2 * rows
    # the PACS is back: resend, then sent
    assert store.resend(study_id=env["study"]) == rows
    assert {(s, a) for _, _, s, a in _states(store)} == {("pending", 0)}
    scp = StorageSCP()
    try:
        assert _exporter(env, _cstore(scp.port)).send_once() == rows
    finally:
        scp.stop()
    assert len(scp.received) == rows
    assert {(s, a) for _, _, s, a in _states(store)} == {("sent", 1)}
    assert store.resend(study_id=env["study"]) == 0  # only failed rows go back
    details = [a.detail for a in store.audit_rows(env["study"]) if a.action.startswith("outbox.")]
    assert all(set(d) <= {"kind", "route", "attempts", "permanent"} for d in details)


def test_backoff_doubles_up_to_its_cap(env: dict[str, Any]) -> None:
    from diagnostics.serve.store import as_utc, now

    store = env["store"]
    store.enqueue(
        study_id=env["study"],
        clinic_id=CLINIC,
        kind="ai_sr",
        key="",
        routes=["cstore"],
        sop_instance_uid="1.2.3",
        file="x.dcm",
        max_attempts=5,
    )
    (item,) = store.due_outbox(5, claim_s=30)
    assert not store.due_outbox(5, claim_s=30)  # claimed: another exporter skips it
    waits = []
    for _ in range(4):
        t0 = now()
        assert store.mark_failed_attempt(
            item.id, "down", permanent=False, backoff_s=10, max_backoff_s=25
        ) in ("pending", "failed")
        (row,) = store.outbox_items()
        waits.append(round((as_utc(row.next_attempt_at) - t0) / timedelta(seconds=1)))
    assert waits[:3] == [10, 20, 25] and row.state == "pending" and row.attempts == 4
    assert store.mark_failed_attempt(item.id, "x", permanent=False, backoff_s=0, max_backoff_s=0)
    assert store.outbox_items()[0].state == "failed"


def test_a_refusal_fails_at_once(env: dict[str, Any]) -> None:
    scp = StorageSCP(status=0xA900)
    try:
        exporter = _exporter(env, _cstore(scp.port))
        rows = exporter.plan_once()
        assert exporter.send_once() == rows
    finally:
        scp.stop()
    assert scp.calls == rows and not scp.received
    items = env["store"].outbox_items()
    assert {(i.state, i.attempts) for i in items} == {("failed", 1)}
    assert all("0xA900" in (i.last_error or "") for i in items)


def test_out_of_resources_is_retried(env: dict[str, Any]) -> None:
    scp = StorageSCP(status=0xA700)
    try:
        exporter = _exporter(env, _cstore(scp.port))
        exporter.plan_once()
        exporter.send_once()
    finally:
        scp.stop()
    assert {(i.state, i.attempts) for i in env["store"].outbox_items()} == {("pending", 1)}


def test_review_srs_refer_to_the_ai_sr_and_to_earlier_reviews(env: dict[str, Any]) -> None:
    store, study = env["store"], env["study"]
    findings = store.study_view(study)["findings"]
    scp = StorageSCP()
    try:
        exporter = _exporter(env, _cstore(scp.port), heatmaps=False)
        assert exporter.plan_once() == 1  # heatmaps off: the AI SR alone
        exporter.send_once()
        (ai_sr,) = scp.received
        # some findings reviewed: no review SR yet
        store.add_reviews(study, "user:anh", [{"label": findings[0]["label"], "verdict": "agree"}])
        assert exporter.plan_once() == 0
        rest = [
            {"label": f["label"], "verdict": "disagree", "corrected_label": "Atelectasis"}
            if i == 0
            else {"label": f["label"], "verdict": "agree", "note": "seen"}
            for i, f in enumerate(findings[1:])
        ]
        rest.append({"unlisted": True, "corrected_label": "Fracture", "note": "rib 6"})
        store.add_reviews(study, "user:anh", rest)
        assert exporter.plan_once() == 1 and exporter.plan_once() == 0
        exporter.send_once()
        # a later change of review: another review SR, referring to both earlier documents
        store.add_reviews(
            study, "user:binh", [{"label": findings[0]["label"], "verdict": "disagree"}]
        )
        assert exporter.plan_once() == 1 and exporter.plan_once() == 0
        exporter.send_once()
    finally:
        scp.stop()
    first, second = scp.received[1:]
    assert str(ai_sr.SOPInstanceUID) not in {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}

    def predecessors(ds: Dataset) -> set[str]:
        return {
            str(i.ReferencedSOPInstanceUID)
            for s in ds.PredecessorDocumentsSequence
            for series in s.ReferencedSeriesSequence
            for i in series.ReferencedSOPSequence
        }

    assert predecessors(first) == {str(ai_sr.SOPInstanceUID)}
    assert predecessors(second) == {str(ai_sr.SOPInstanceUID), str(first.SOPInstanceUID)}
    for ds in (first, second):
        assert ds.SOPClassUID == SR and ds.VerificationFlag == "VERIFIED"
        _same_patient(ds, env["sources"][0])
    assert "binh" in str(second.VerifyingObserverSequence[0].VerifyingObserverName)
    kinds = sorted((i.kind, i.key, i.state) for i in store.outbox_items())
    assert [k for k, _, _ in kinds] == ["ai_sr", "review_sr", "review_sr"]
    assert {s for _, _, s in kinds} == {"sent"}


def test_stow_rs_route(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_STOW_USER", "diag")
    monkeypatch.setenv("TEST_STOW_PASSWORD", "s3cret-pw")
    stow = StowServer(status=200)
    try:
        dest = {
            "stow_url": stow.url,
            "stow_user_env": "TEST_STOW_USER",
            "stow_password_env": "TEST_STOW_PASSWORD",
        }
        exporter = _exporter(env, dest, heatmaps=False)
        assert exporter.plan_once() == 1
        assert exporter.send_once() == 1
        path, headers, body = stow.requests[0]
        assert path == "/dicom-web/studies"
        ctype = headers["Content-Type"]
        assert ctype.startswith("multipart/related") and 'type="application/dicom"' in ctype
        assert headers["Authorization"].startswith("Basic ")
        boundary = ctype.split("boundary=")[1]
        part = body.split(f"--{boundary}".encode())[1]
        ds = dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]))
        assert ds.SOPClassUID == SR
        assert env["store"].outbox_items()[0].state == "sent"
        # a refusal (409) fails at once; a busy server (503) is tried again
        for status, state in ((409, "failed"), (503, "pending")):
            env["store"].write(_due_again)
            stow.status = status
            exporter.send_once()
            (item,) = env["store"].outbox_items()
            assert item.state == state and str(status) in (item.last_error or "")
    finally:
        stow.stop()


def test_cli_outbox_and_resend(env: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from diagnostics.cli.dicom_export import outbox, resend

    down = _exporter(env, _cstore(closed_port()), max_attempts=1)
    down.plan_once()
    down.send_once()
    config = env["dir"] / "serve.yaml"
    config.write_text(
        f"data_dir: {env['dir']}\ndatabase_url: sqlite:///{env['dir'] / 'service.db'}\n"
    )
    outbox(state="failed", study=None, config=config, sets=None)
    out = capsys.readouterr().out
    assert "last error" in out and "ai_sr" in out and "failed" in out and "1/1" in out
    resend(study=env["study"], all_failed=False, config=config, sets=None)
    assert "pending again" in capsys.readouterr().out
    assert {i.state for i in env["store"].outbox_items()} == {"pending"}


def test_a_review_the_sr_cannot_state_waits_for_the_next_review(
    env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    from diagnostics.serve.dicom import results

    store, study = env["store"], env["study"]
    labels = [f["label"] for f in store.study_view(study)["findings"]]
    exporter = _exporter(env, _cstore(closed_port()), heatmaps=False)
    assert exporter.plan_once() == 1
    store.add_reviews(
        study,
        "user:anh",
        [{"label": x, "verdict": "uncertain" if i == 0 else "agree"} for i, x in enumerate(labels)],
    )
    if "uncertain" in results.VERDICTS:
        assert exporter.plan_once() == 1
    else:  # logged once, not tried again, and the next review of the study is made
        assert exporter.plan_once() == 0 and exporter.plan_once() == 0
        assert caplog.text.count("review_sr not made") == 1
        store.add_reviews(study, "user:anh", [{"label": labels[0], "verdict": "agree"}])
        assert exporter.plan_once() == 1
    assert exporter.plan_once() == 0


def test_the_exporter_thread_sends_then_stops(env: dict[str, Any]) -> None:
    import time

    from diagnostics.serve.dicom.export import start_thread

    scp = StorageSCP()
    try:
        exporter = _exporter(env, _cstore(scp.port), poll_s=0.05)
        thread, stop = start_thread(exporter)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = {s for _, _, s, _ in _states(env["store"])}
            if states == {"sent"}:
                break
            time.sleep(0.05)
        stop.set()
        exporter.wake.set()
        thread.join(timeout=10)
    finally:
        scp.stop()
    assert states == {"sent"} and not thread.is_alive()
    assert len(scp.received) == len(env["store"].outbox_items())
