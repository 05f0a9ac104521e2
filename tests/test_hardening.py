"""Regression tests for the clinic service under bad input and faults (issue 12, D1-D8 and the
points under "Also"). Each sends the bad input through the real service (uvicorn on loopback,
real SQLite, the real ONNX model) and checks the status, the code and that nothing was stored.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import shared
from service_support import dicom_bytes, png_bytes, running_service, serve_config, synth_pixels

from diagnostics.imaging import ImageError, decode, inspect_header


@pytest.fixture(scope="module")
def service(cxr_model, tmp_path_factory):
    cfg = serve_config(
        cxr_model,
        tmp_path_factory.mktemp("hard") / "serve",
        timeouts={"headers_s": 1.0, "body_idle_s": 1.0, "body_total_s": 3.0},
    )
    with running_service(cfg) as svc:
        yield svc


def _counts(svc) -> tuple[int, int, int]:
    blobs = [p for p in (svc.data_dir / "blobs").rglob("*") if p.is_file()]
    parts = sum(1 for p in blobs if p.suffix == ".part")
    kept = sum(1 for p in blobs if p.parent.name != "tmp")
    return len(svc.store.list_studies(None, limit=10000)), kept, parts


def refused(svc, data: bytes, status: int, code: str, **kw) -> dict:
    """Send `data`; it must be refused with `status` and `code`, and leave nothing behind."""
    before = _counts(svc)
    r = svc.upload(data, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == code, body
    assert _counts(svc)[:2] == before[:2]  # no study row, no blob
    assert _counts(svc)[2] == 0  # no partial upload left
    return body


def _dicom(seed: int, **changes) -> pydicom.Dataset:
    from diagnostics.data.synthetic import dicom_dataset, to_stored

    (px,) = synth_pixels(1, seed=seed)
    ds = dicom_dataset(
        to_stored(px, 12, "MONOCHROME2"), bits=12, photometric="MONOCHROME2", uid_seed=str(seed)
    )
    for k, v in changes.items():
        setattr(ds, k, v)
    return ds


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- D1


@pytest.mark.parametrize(
    "tag", ["Rows", "Columns", "NumberOfFrames", "BitsAllocated", "SamplesPerPixel"]
)
@pytest.mark.parametrize("kind", ["text", "binary"])
def test_d1_non_integer_size_tags_are_422_not_500(service, tag, kind):
    ds = _dicom(10)
    ds["PixelData"].VR = "OW"  # the writer would otherwise read BitsAllocated to choose it
    keyword = pydicom.datadict.tag_for_keyword(tag)
    if kind == "text":
        ds.add_new(keyword, "LO", "abc")
    else:
        ds.add_new(keyword, "OB", b"\x01\x02\x03\x04")
    refused(service, _bytes(ds), 422, "corrupt_image")
    actions = [a.action for a in service.store.audit_rows() if a.action == "upload.refused"]
    assert actions  # the refusal is audited


# --------------------------------------------------------------------------- D3


def test_d3_disk_full_while_streaming_is_507(service, monkeypatch, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full is not available here")

    def full_temp() -> Path:
        link = service.store.blobs.tmp / f"full-{time.monotonic_ns()}.part"
        link.symlink_to("/dev/full")  # every write: ENOSPC
        return link

    monkeypatch.setattr(service.store.blobs, "temp_file", full_temp)
    (px,) = synth_pixels(1, seed=11)
    refused(service, dicom_bytes(px), 507, "insufficient_storage")


def test_d3_full_database_answers_507_to_uploads_and_keeps_reads(cxr_model, tmp_path):
    from sqlalchemy import event, text

    cfg = serve_config(cxr_model, tmp_path / "serve")
    with running_service(cfg) as svc:
        (px,) = synth_pixels(1, seed=12)
        sid = svc.upload(dicom_bytes(px)).json()["id"]
        assert svc.wait(sid)["status"] == "scored"
        store = svc.store
        with store.engine.connect() as conn:
            pages = conn.execute(text("PRAGMA page_count")).scalar()

        for engine in (store.engine, store.write_engine):

            @event.listens_for(engine, "connect")
            def _cap(dbapi_conn, _record, pages=pages):
                dbapi_conn.execute(f"PRAGMA max_page_count = {pages + 2}")

            engine.dispose()
        from diagnostics.serve.store import StoreFull

        with pytest.raises(StoreFull):  # fill what room is left
            for i in range(100000):
                store.write(lambda s, i=i: store.audit(s, "test", "filler", "x" * 200, str(i)))
        assert store.full
        (px,) = synth_pixels(1, seed=13)
        refused(svc, dicom_bytes(px), 507, "insufficient_storage")
        r = svc.get(f"/v1/studies/{sid}")  # each read writes an audit row: it must still work
        assert r.status_code == 200 and r.json()["status"] == "scored"
        assert svc.get("/v1/studies").status_code == 200
        ready = httpx.get(f"{svc.url}/health/ready", timeout=30)
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == {
            "ok": False,
            "dialect": "sqlite",
            "error": "full",
        }


def test_d3_ready_is_unavailable_on_a_full_disk_even_with_no_reserve(service, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(100, 100, 0))
    r = httpx.get(f"{service.url}/health/ready", timeout=30)
    assert r.status_code == 503 and r.json()["checks"]["disk"]["ok"] is False
    monkeypatch.undo()
    assert httpx.get(f"{service.url}/health/ready", timeout=30).status_code == 200


# --------------------------------------------------------------------------- D5, D6


def _raw_connection(svc) -> socket.socket:
    host, port = svc.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(sock: socket.socket, limit_s: float) -> bytes:
    sock.settimeout(limit_s)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open over {limit_s} s") from None
    return out


def test_d5_stalled_headers_are_cut_off_without_a_key(service):
    t0 = time.monotonic()
    with _raw_connection(service) as sock:
        sock.sendall(b"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Ty")  # and nothing more
        assert _read_all(sock, 10) == b""  # closed by the server
    assert time.monotonic() - t0 < 5
    with _raw_connection(service) as sock:  # a connection that sends nothing at all
        assert _read_all(sock, 10) == b""


def _stalled_upload(service, pace_s: float | None) -> bytes:
    (px,) = synth_pixels(1, seed=14)
    data = dicom_bytes(px)
    body = (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.dcm"\r\n'
        b"Content-Type: application/dicom\r\n\r\n" + data + b"\r\n--B--\r\n"
    )
    head = (
        f"POST /v1/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {service.submitter}\r\n"
        f"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with _raw_connection(service) as sock:
        sock.sendall(head + body[:1000])
        if pace_s is not None:  # a trickle: a few bytes now and then, never a pause over idle
            sock.settimeout(0.1)
            for i in range(1000, len(body) - 10, 10):
                try:
                    sock.sendall(body[i : i + 10])
                except OSError:
                    break
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break  # the server answered
                except TimeoutError:
                    pass
                time.sleep(pace_s)
        return _read_all(sock, 15)


@pytest.mark.parametrize("pace_s", [None, 0.3], ids=["stalled", "trickle"])
def test_d5_stalled_or_endless_body_is_408_and_keeps_nothing(service, pace_s):
    before = _counts(service)
    answer = _stalled_upload(service, pace_s)
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 408 " in status_line, answer[:300]
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["code"] == "request_timeout"
    time.sleep(0.2)
    assert _counts(service) == (*before[:2], 0)  # nothing stored, no .part left


def test_d6_abandoned_partial_uploads_are_removed_while_running(service):
    tmp = service.store.blobs.tmp
    old, fresh = tmp / "crashed.part", tmp / "live.part"
    old.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 100)
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    deadline = time.monotonic() + 20  # the janitor runs every min(60 s, body_total_s) = 3 s
    while old.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not old.exists()
    assert fresh.exists()  # a live upload (of any process) is younger than the longest request
    fresh.unlink()


# --------------------------------------------------------------------------- D7, D8


@pytest.mark.parametrize(
    "changes",
    [
        {"BitsStored": 20},  # > BitsAllocated (16)
        {"HighBit": 17},
        {"PixelRepresentation": 2},
        {"NumberOfFrames": -3},
        {"NumberOfFrames": 0},
        {"BitsAllocated": 1},
    ],
    ids=lambda c: next(iter(c.items())).__repr__(),
)
def test_d7_header_decidable_refusals_store_nothing(service, changes):
    refused(service, _bytes(_dicom(20, **changes)), 422, "corrupt_image")


def test_d7_compressed_image_smaller_than_its_header_says(service):
    from pydicom.uid import JPEG2000Lossless

    ds = _dicom(21)
    ds.compress(JPEG2000Lossless)
    ds.Rows = ds.Rows * 4  # the codestream says 64 rows
    body = refused(service, _bytes(ds), 422, "corrupt_image")
    assert "header says" in body["detail"]


def test_d7_real_compressed_file_with_wrong_rows(service):
    path = shared("dicom", "pydicom-data_RG1_J2KR.dcm")
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Rows + 100
    refused(service, _bytes(ds), 422, "corrupt_image")


@pytest.mark.parametrize("kind", ["multi", "binary", "letters"])
def test_d8_sop_instance_uid_must_be_one_uid(service, kind):
    ds = _dicom(22)
    tag = pydicom.datadict.tag_for_keyword("SOPInstanceUID")
    if kind == "multi":
        ds.SOPInstanceUID = ["1.2.3", "1.2.4"]
    elif kind == "binary":
        ds.add_new(tag, "OB", b"\x01\x02\x03\x04")
    else:
        ds.add_new(tag, "LO", "1.2.abc")
    refused(service, _bytes(ds), 422, "invalid_uid")


def test_d4_uid_with_leading_zeros_is_accepted(service):
    ds = _dicom(23)
    ds.SOPInstanceUID = "1.2.840.0113654.2.3.1995.3.0.4.1"  # as real devices write them
    r = service.upload(_bytes(ds))
    assert r.status_code == 202, r.text
    assert service.wait(r.json()["id"])["status"] == "scored"


# --------------------------------------------------------------------------- D2, D4 with the CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read().decode()}")
        try:
            if httpx.get(f"{url}/health/live", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve did not start")


def test_d2_restart_right_after_a_crash_and_d4_no_uids_in_logs(cxr_model, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DIAGNOSTICS_HOME": str(tmp_path / "home")}
    cmd = [
        str(Path(sys.executable).with_name("diagnostics")),
        "serve",
        "--dev",
        "--port",
        str(port),
        "--set",
        f"model.path={cxr_model}",
        "--set",
        "auth=false",
        "--set",
        "limits.disk_reserve_mb=0",
    ]
    proc = _start(cmd, env, url)
    uid = "1.2.840.0113654.2.3.1995.3.0.4.1"
    try:
        ds = _dicom(30)
        ds.SOPInstanceUID = uid
        files = {"file": ("x.dcm", _bytes(ds), "application/dicom")}
        # Connection: close makes the server close first, leaving its side in TIME_WAIT.
        r = httpx.post(f"{url}/v1/studies", files=files, headers={"Connection": "close"})
        assert r.status_code == 202, r.text
        sid = r.json()["id"]
        for _ in range(300):
            doc = httpx.get(f"{url}/v1/studies/{sid}", headers={"Connection": "close"}).json()
            if doc["status"] in ("scored", "failed_qc", "failed"):
                break
            time.sleep(0.1)
        assert doc["status"] == "scored"
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: no clean shutdown
        proc.wait(10)
    stderr = proc.stderr.read().decode()
    assert uid not in stderr and "0113654" not in stderr
    for line in stderr.splitlines():  # every line is a JSON log record
        assert line.startswith("{") and json.loads(line)["level"], line
    again = _start(cmd, env, url)  # at once: no 60 s wait for TIME_WAIT
    again.send_signal(signal.SIGTERM)
    again.wait(30)


# --------------------------------------------------------------------------- "Also"


def test_metrics_and_docs_need_a_key_or_are_off(service):
    assert httpx.get(f"{service.url}/metrics").status_code == 401
    assert service.get("/metrics", service.reviewer).status_code == 403
    assert service.get("/metrics", service.admin).status_code == 200
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{service.url}{path}").status_code == 404, path


def test_api_docs_can_be_turned_on(cxr_model, tmp_path):
    cfg = serve_config(cxr_model, tmp_path / "serve", api_docs=True)
    with running_service(cfg) as svc:
        assert httpx.get(f"{svc.url}/openapi.json").status_code == 200


@pytest.mark.parametrize("path", ["/review/login", "/health/live", "/v1/studies"])
def test_security_headers(service, path):
    r = service.get(path)
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"


def test_file_names_are_not_stored_or_shown_by_default(service):
    (px,) = synth_pixels(1, seed=40)
    r = service.upload(png_bytes(px), filename="NGUYEN_VAN_A_1975.png", content_type="image/png")
    assert r.status_code == 202 and r.json()["filename"] is None
    sid = r.json()["id"]
    assert service.store.get_study(sid).original_filename == ""
    assert "NGUYEN" not in service.get(f"/v1/studies/{sid}").text
    assert "NGUYEN" not in json.dumps(service.get("/v1/studies").json())


def test_file_names_are_kept_where_a_site_turns_it_on(cxr_model, tmp_path):
    cfg = serve_config(cxr_model, tmp_path / "serve", privacy={"store_filenames": True})
    with running_service(cfg) as svc:
        (px,) = synth_pixels(1, seed=41)
        r = svc.upload(png_bytes(px), filename="dir/film-7.png", content_type="image/png")
        assert r.json()["filename"] == "film-7.png"


def _rgba_png(alpha: np.ndarray) -> bytes:
    from PIL import Image

    (px,) = synth_pixels(1, seed=42)
    grey = np.round(px * 255).astype(np.uint8)
    rgba = np.dstack([grey, grey, grey, alpha.astype(np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def test_transparent_png_is_refused_and_an_opaque_alpha_is_fine(service):
    clear = np.zeros((64, 64))
    refused(service, _rgba_png(clear), 422, "transparent_image", content_type="image/png")
    half = np.full((64, 64), 255)
    half[:, :32] = 0
    refused(service, _rgba_png(half), 422, "transparent_image", content_type="image/png")
    r = service.upload(_rgba_png(np.full((64, 64), 255)), content_type="image/png")
    assert r.status_code == 202, r.text


# --------------------------------------------------------------------------- never a crash


def test_mangled_headers_raise_only_image_errors():
    """Random byte changes in a DICOM header: every outcome is a decoded image or an
    `ImageError` (a 4xx at the service), never another exception (a 500), and no library
    warning escapes (pydicom's quote tag values)."""
    base = bytearray(_bytes(_dicom(50)))
    pixel_start = bytes(base).index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
    rng = random.Random(0)
    warnings.simplefilter("error", UserWarning)  # (pytest restores the filters) nor a warning
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(132, pixel_start)] = rng.randrange(256)
        for fn in (inspect_header, decode):
            with contextlib.suppress(ImageError):
                fn(bytes(data))


# --------------------------------------------------------------------------- found by a red team


def _panicking_rle() -> bytes:
    """The synthetic DICOM, RLE-compressed, with 4 bytes of its RLE data changed: the Rust RLE
    decoder panics on it (pyo3's PanicException is not an Exception)."""
    from pydicom.uid import RLELossless

    ds = _dicom(60)
    ds.compress(RLELossless)
    data = bytearray(_bytes(ds))
    start = bytes(data).index(b"\xe0\x7f\x10\x00") + 12
    rng = random.Random(3)
    for p in [rng.randrange(start + 100, len(data) - 10) for _ in range(4)]:
        data[p] = rng.randrange(256)
    return bytes(data)


def test_a_decoder_panic_fails_the_study_and_the_worker_goes_on(service):
    r = service.upload(_panicking_rle())
    assert r.status_code == 202, r.text
    doc = service.wait(r.json()["id"])
    assert doc["status"] == "failed_qc" and doc["error_code"] == "corrupt_image", doc
    (px,) = synth_pixels(1, seed=61)
    after = service.upload(dicom_bytes(px))
    assert service.wait(after.json()["id"])["status"] == "scored"  # the worker is alive
    ready = httpx.get(f"{service.url}/health/ready", timeout=30).json()
    assert ready["checks"]["worker"]["ok"] is True


def test_a_damaged_exif_block_is_a_corrupt_image(service):
    from PIL import Image

    (px,) = synth_pixels(1, seed=62)
    buf = io.BytesIO()
    Image.fromarray(np.round(px * 255).astype(np.uint8)).save(buf, "JPEG")
    app1 = bytes.fromhex(  # an EXIF orientation tag whose IFD points past the block
        "ffe100664578696600004d4d002a000000080003010300020000000600000032011200030000000100"
        "060000876900040000000100000038000000004d616b657200000190030002000000140000004a0000"
        "0000323032303a30313a30312030303a30303a303000"
    )
    jpeg = buf.getvalue()[:2] + app1 + buf.getvalue()[2:]
    with pytest.raises(ImageError):
        decode(jpeg)
    r = service.upload(jpeg, content_type="image/jpeg")
    doc = service.wait(r.json()["id"])
    assert doc["status"] == "failed_qc" and doc["error_code"] == "corrupt_image", doc


def test_an_overlong_multipart_boundary_is_400(service):
    r = httpx.post(
        f"{service.url}/v1/studies",
        content=b"--x\r\n",
        headers={
            **service.headers(service.submitter),
            "Content-Type": "multipart/form-data; boundary=" + "b" * 5000,
        },
    )
    assert r.status_code == 400 and r.json()["code"] == "bad_multipart", r.text


@pytest.mark.parametrize("since", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00"])
def test_since_past_the_range_of_dates_is_422(service, since):
    r = httpx.get(
        f"{service.url}/v1/studies",
        params={"since": since},
        headers=service.headers(service.submitter),
    )
    assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text


@pytest.mark.parametrize(
    "path", ["/v1/studies/%00", "/v1/studies/a%00b/report", "/review/?clinic=%00"]
)
def test_nul_in_a_path_or_query_is_400(service, path):
    r = httpx.get(f"{service.url}{path}", headers=service.headers(service.admin))
    assert r.status_code == 400 and r.json()["code"] == "bad_request", r.text


def test_nul_in_a_review_note_is_422(service):
    (px,) = synth_pixels(1, seed=63)
    sid = service.upload(dicom_bytes(px)).json()["id"]
    label = service.wait(sid)["findings"][0]["label"]
    r = httpx.post(
        f"{service.url}/v1/studies/{sid}/reviews",
        json={"reviews": [{"label": label, "verdict": "agree", "note": "a\u0000b"}]},
        headers=service.headers(service.reviewer),
    )
    assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text


def test_concurrent_conflicts_leave_no_file_behind(service):
    import concurrent.futures as cf

    payloads = [dicom_bytes(px) for px in synth_pixels(8, seed=64)]
    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(lambda d: service.upload(d, **{"Idempotency-Key": "same-key"}), payloads)
        )
    assert sorted(r.status_code for r in codes).count(202) == 1
    assert {r.status_code for r in codes} <= {202, 409}
    held = {s.content_sha256 for s in service.store.list_studies(None, limit=10000)}
    files = {p.name for p in (service.data_dir / "blobs").rglob("*") if p.parent.name != "tmp"}
    assert {p for p in files if len(p) == 64} <= held  # no file without its study


def test_a_large_body_is_413_before_the_key_is_checked(service):
    r = httpx.post(
        f"{service.url}/v1/studies/x/reviews",
        content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["code"] == "request_too_large", r.text


def test_a_reused_idempotency_key_is_still_rate_limited(cxr_model, tmp_path):
    cfg = serve_config(cxr_model, tmp_path / "serve", limits={"rate_per_minute": 2})
    with running_service(cfg) as svc:
        first, *rest = [dicom_bytes(px) for px in synth_pixels(4, seed=65)]
        assert svc.upload(first, **{"Idempotency-Key": "K1"}).status_code == 202
        codes = [svc.upload(d, **{"Idempotency-Key": "K1"}).status_code for d in rest]
        assert 429 in codes


def test_unknown_methods_share_one_metrics_label(service):
    for i in range(5):
        httpx.request(f"XMETHOD{i}", f"{service.url}/health/live")
    text = service.get("/metrics", service.admin).text
    assert "XMETHOD" not in text
    assert 'method="other"' in text


def test_character_set_text_never_reaches_the_logs(service, caplog):
    import logging

    ds = _dicom(66)
    ds.SpecificCharacterSet = "NGUYEN VAN A DOB 1975-01-01"
    data = _bytes(ds)  # (pydicom warns here, in the test, as it writes the file)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        r = service.upload(data)
        service.wait(r.json()["id"])
    assert "NGUYEN" not in caplog.text and "1975" not in caplog.text


def test_a_chunked_json_body_over_the_cap_is_413_not_400(service):
    """No Content-Length: the cap trips while FastAPI reads the JSON body."""

    def chunks():
        yield b'{"reviews": ['
        for _ in range(400):
            yield b'{"label": "Pneumonia", "verdict": "agree", "note": "' + b"x" * 1000 + b'"},'
        yield b"]}"

    r = httpx.post(
        f"{service.url}/v1/studies/x/reviews",
        content=chunks(),
        headers={**service.headers(service.reviewer), "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["code"] == "request_too_large", r.text


def test_a_stalled_json_body_is_408_not_400(service):
    head = (
        "POST /v1/studies/x/reviews HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {service.reviewer}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    with _raw_connection(service) as sock:
        sock.sendall(head + b'{"reviews": ')  # and then nothing
        answer = _read_all(sock, 15)
    assert b" 408 " in answer.split(b"\r\n", 1)[0], answer[:200]
    assert b"request_timeout" in answer
