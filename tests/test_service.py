"""The clinic service end to end: a real uvicorn server on loopback, a real ONNX model exported
by the project, real SQLite (and PostgreSQL where reachable), the real shared DICOM files."""

from __future__ import annotations

import concurrent.futures as cf

import pytest
from conftest import shared
from service_support import (
    colour_photo,
    dicom_bytes,
    pg_schema_url,
    png_bytes,
    png_header_only,
    running_service,
    serve_config,
    synth_pixels,
)


@pytest.fixture(scope="module")
def service(cxr_model, tmp_path_factory):
    cfg = serve_config(cxr_model, tmp_path_factory.mktemp("svc") / "serve")
    with running_service(cfg) as svc:
        yield svc


def _blob_count(svc) -> int:
    return sum(
        1 for p in (svc.data_dir / "blobs").rglob("*") if p.is_file() and p.parent.name != "tmp"
    )


def test_upload_score_and_read_back(service):
    (px,) = synth_pixels(1, seed=500)
    r = service.upload(dicom_bytes(px))
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/studies/{r.json()['id']}"
    doc = service.wait(r.json()["id"])
    assert doc["status"] == "scored", doc
    assert {f["label"] for f in doc["findings"]} == set(service.app.state.holder.model.labels)
    f = doc["findings"][0]
    assert f["model_sha256"] == service.app.state.holder.model.sha256
    assert f["provider"] == "CPUExecutionProvider" and f["preprocess_version"] == "1"
    assert doc["result"]["timing_ms"]["total"] > 0


# --------------------------------------------------------------------------- bad inputs


def _refused(service, data: bytes, status: int, code: str, **kw) -> None:
    before_rows = len(service.store.list_studies(None, limit=1000))
    before_blobs = _blob_count(service)
    r = service.upload(data, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == code and body["status"] == status and body["detail"]
    assert len(service.store.list_studies(None, limit=1000)) == before_rows  # nothing stored
    assert _blob_count(service) == before_blobs
    assert not list((service.data_dir / "blobs" / "tmp").glob("*.part"))


def test_zero_byte_file(service):
    _refused(service, b"", 400, "empty_file")


def test_truncated_synthetic_dicom(service):
    (px,) = synth_pixels(1, seed=501)
    data = dicom_bytes(px)
    _refused(service, data[: len(data) // 2], 422, "truncated_file")


def test_truncated_real_dicom(service):
    data = shared("dicom", "pydicom-data_RG1_UNCR.dcm").read_bytes()
    # cut inside the pixel data: pydicom reads this without complaint; the service must not
    _refused(service, data[: int(len(data) * 0.6)], 422, "truncated_file")


def test_dicom_without_pixel_data(service):
    (px,) = synth_pixels(1, seed=502)
    _refused(service, dicom_bytes(px, PixelData=None), 422, "no_pixel_data")


def test_multi_frame(service):
    (px,) = synth_pixels(1, seed=503)
    one = dicom_bytes(px, uid_seed="mf")
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(one))
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    _refused(service, buf.getvalue(), 422, "multi_frame")


def test_ct_modality(service):
    (px,) = synth_pixels(1, seed=504)
    _refused(service, dicom_bytes(px, Modality="CT"), 422, "modality_not_supported")


def test_png_header_claiming_huge_size(service):
    _refused(
        service,
        png_header_only(65535, 8193),
        422,
        "image_too_large",
        filename="big.png",
        content_type="image/png",
    )


def test_non_image_sent_as_image(service):
    _refused(
        service,
        b"%PDF-1.4 not an image at all " * 10,
        415,
        "unsupported_media_type",
        filename="scan.png",
        content_type="image/png",
    )


def test_upload_over_the_size_limit_is_refused_while_streaming(service):
    (px,) = synth_pixels(1, seed=505)
    big = dicom_bytes(px) + b"\0" * (9 * 1024 * 1024)  # the limit is 8 MB in these tests
    _refused(service, big, 413, "upload_too_large")


def test_real_extremity_radiograph_is_refused_by_body_part(service):
    data = shared("dicom", "WG04_RG3_RLE.dcm").read_bytes()
    _refused(service, data, 422, "body_part_not_chest")


def test_lateral_view_is_refused(service):
    (px,) = synth_pixels(1, seed=506)
    _refused(service, dicom_bytes(px, ViewPosition="LL"), 422, "view_not_frontal")


def test_filename_with_path_traversal_is_metadata_only(service):
    (px,) = synth_pixels(1, seed=507)
    r = service.upload(
        png_bytes(px), filename="../../../etc/cron.d/evil.png", content_type="image/png"
    )
    assert r.status_code == 202, r.text
    assert r.json()["filename"] is None  # file names are not kept unless a site turns it on
    root = service.data_dir.parent
    assert not (root / "etc").exists() and not (service.data_dir / "etc").exists()
    sha = r.json()["sha256"]
    assert service.store.blobs.path(sha).is_file()  # stored under its hash, not its name
    assert service.wait(r.json()["id"])["status"] == "scored"


def _qc_refusal(service, data: bytes, code: str, **kw) -> dict:
    r = service.upload(data, **kw)
    assert r.status_code == 202, r.text
    doc = service.wait(r.json()["id"])
    assert doc["status"] == "failed_qc" and doc["error_code"] == code, doc
    assert doc["findings"] == []  # a refusal is never a score
    failed = [q for q in doc["result"]["qc"] if not q["passed"]]
    assert failed[0]["code"] == code and failed[0]["message"]
    return doc


def test_constant_image_is_refused_by_qc(service):
    import numpy as np

    _qc_refusal(
        service,
        png_bytes(np.full((96, 96), 0.5)),
        "constant_image",
        filename="flat.png",
        content_type="image/png",
    )


def test_colour_photo_is_refused_by_qc(service):
    _qc_refusal(
        service, colour_photo(), "colour_image", filename="photo.jpg", content_type="image/jpeg"
    )


def test_grey_photo_and_real_chest_are_out_of_distribution_for_a_synthetic_model(service):
    """The fixture model knows only synthetic chests: a grey photo is refused by its OOD check;
    so is a real chest radiograph, rightly, for this model."""
    import io

    from PIL import Image

    grey = io.BytesIO()
    Image.open(io.BytesIO(colour_photo())).convert("L").save(grey, "PNG")
    doc = _qc_refusal(
        service, grey.getvalue(), "out_of_distribution", filename="g.png", content_type="image/png"
    )
    assert doc["result"]["ood_score"] > service.app.state.holder.model.metadata.ood.threshold


# --------------------------------------------------------------------------- idempotency


def test_retry_of_the_same_bytes_returns_the_same_study(service):
    (px,) = synth_pixels(1, seed=510)
    data = dicom_bytes(px, uid_seed="retry")
    first = service.upload(data)
    again = service.upload(data)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["duplicate"] is True
    # same SOP Instance UID, different bytes: 409
    changed = dicom_bytes(px * 0.9 + 0.05, uid_seed="retry")
    r = service.upload(changed)
    assert r.status_code == 409 and r.json()["code"] == "sop_instance_conflict"


def test_idempotency_key(service):
    a, b = synth_pixels(2, seed=511)
    first = service.upload(
        png_bytes(a), filename="a.png", content_type="image/png", **{"Idempotency-Key": "visit-42"}
    )
    again = service.upload(
        png_bytes(a), filename="a.png", content_type="image/png", **{"Idempotency-Key": "visit-42"}
    )
    assert again.json()["id"] == first.json()["id"]
    other = service.upload(
        png_bytes(b), filename="b.png", content_type="image/png", **{"Idempotency-Key": "visit-42"}
    )
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"


# --------------------------------------------------------------------------- access


def test_cross_clinic_access_is_404(service):
    (px,) = synth_pixels(1, seed=520)
    sid = service.upload(dicom_bytes(px)).json()["id"]
    r = service.get(f"/v1/studies/{sid}", key=service.other_clinic)
    assert r.status_code == 404 and r.json()["code"] == "study_not_found"
    listed = service.get("/v1/studies", key=service.other_clinic).json()["studies"]
    assert sid not in {s["id"] for s in listed}
    assert sid in {s["id"] for s in service.get("/v1/studies").json()["studies"]}
    # the same bytes from another clinic are another study: de-duplication is per clinic
    r = service.upload(dicom_bytes(px), key=service.other_clinic)
    assert r.status_code == 202 and r.json()["id"] != sid


def test_authentication(service):
    import httpx

    r = httpx.get(f"{service.url}/v1/studies")
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
    r = service.get("/v1/studies", key="dk_nothing_here")
    assert r.status_code == 401 and r.json()["code"] == "invalid_key"
    r = service.get("/v1/worklist")  # a submitter is not a reviewer
    assert r.status_code == 403 and r.json()["code"] == "role_forbidden"
    (px,) = synth_pixels(1, seed=521)
    r = service.upload(dicom_bytes(px), key=service.reviewer)
    assert r.status_code == 403


def test_revoked_and_rotated_keys(service):
    row, key = service.store.create_key("submitter", clinic="clinic-a")
    assert service.get("/v1/studies", key=key).status_code == 200
    new_row, new_key = service.store.rotate_key(row.id)
    assert service.get("/v1/studies", key=key).status_code == 401
    assert service.get("/v1/studies", key=new_key).status_code == 200
    service.store.revoke_key(new_row.id)
    assert service.get("/v1/studies", key=new_key).status_code == 401
    actions = [a.action for a in service.store.audit_rows(new_row.id)]
    assert actions == ["key.create", "key.revoke"]


# --------------------------------------------------------------------------- review


def test_worklist_and_reviews(service):
    import httpx

    ids = [service.upload(dicom_bytes(px)).json()["id"] for px in synth_pixels(3, seed=530)]
    for sid in ids:
        service.wait(sid)
    items = service.get("/v1/worklist", key=service.reviewer).json()["studies"]
    scored = [i for i in items if i["any_positive"] is not None]
    keys = [(not i["any_positive"], -i["top_probability"]) for i in scored]
    assert keys == sorted(keys)  # positives first, then by probability
    assert all(i["clinic"] == "clinic-a" for i in items)
    sid = ids[0]
    label = service.get(f"/v1/studies/{sid}").json()["findings"][0]["label"]
    url = f"{service.url}/v1/studies/{sid}/reviews"
    h = service.headers(service.reviewer)
    r = httpx.post(url, json={"reviews": [{"label": label, "verdict": "agree"}]}, headers=h)
    assert r.status_code == 201, r.text
    r = httpx.post(
        url,
        json={
            "reviews": [
                {
                    "label": label,
                    "verdict": "disagree",
                    "corrected_label": "No_Finding",
                    "note": "old scar",
                }
            ]
        },
        headers=h,
    )
    assert r.status_code == 201
    doc = service.get(f"/v1/studies/{sid}", key=service.reviewer).json()
    f = next(f for f in doc["findings"] if f["label"] == label)
    assert f["review"]["verdict"] == "disagree"  # the latest supersedes
    assert [x["verdict"] for x in f["review_history"]] == ["disagree", "agree"]  # nothing lost
    bad = httpx.post(url, json={"reviews": [{"label": label, "verdict": "maybe"}]}, headers=h)
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"
    other = httpx.post(
        url,
        json={"reviews": [{"label": label, "verdict": "agree"}]},
        headers=service.headers(service.other_clinic),
    )
    assert other.status_code == 403


def test_audit_trail_and_logs_have_no_patient_data(service, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    (px,) = synth_pixels(1, seed=540)
    data = dicom_bytes(px, PatientName="NGUYEN^VAN^A", PatientID="HIS-778899")
    sid = service.upload(data).json()["id"]
    service.wait(sid)
    rows = service.store.audit_rows(sid)
    actions = [a.action for a in rows]
    assert actions[:4] == ["study.upload", "instance.received", "study.queued", "study.running"]
    assert "study.scored" in actions and "study.read" in actions
    text = repr([(a.actor, a.action, a.object_id, a.detail) for a in service.store.audit_rows()])
    assert "NGUYEN" not in text and "HIS-778899" not in text
    doc = service.get(f"/v1/studies/{sid}").text
    assert "NGUYEN" not in doc and "HIS-778899" not in doc
    logs = caplog.text
    assert sid in logs  # the service did log this study, by its generated ID
    for secret in ("NGUYEN", "HIS-778899", service.submitter, "1.2.826"):
        assert secret not in logs


# --------------------------------------------------------------------------- health, metrics


def test_health_and_metrics(service):
    import httpx

    assert httpx.get(f"{service.url}/health/live").json() == {"status": "ok"}
    ready = httpx.get(f"{service.url}/health/ready").json()
    assert ready["status"] == "ok"
    assert ready["checks"]["model"]["sha256"] == service.app.state.holder.model.sha256
    assert ready["checks"]["model"]["provider"] == "CPUExecutionProvider"
    assert httpx.get(f"{service.url}/metrics").status_code == 401  # the figures need a key
    assert service.get("/metrics").status_code == 403  # a clinic's key is not enough
    text = service.get("/metrics", key=service.admin).text
    assert "diagnostics_queue_depth" in text
    assert 'diagnostics_http_requests_total{method="POST",route="/v1/studies"' in text
    assert "diagnostics_scoring_seconds_bucket" in text
    assert "diagnostics_qc_refusals_total" in text


def test_cuda_requested_without_cuda_is_a_reported_fallback(cxr_model, caplog):
    import onnxruntime as ort

    from diagnostics.serve.runner import OnnxModel

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    m = OnnxModel(cxr_model, device="cuda")
    assert m.provider == "CPUExecutionProvider" and m.fallback
    assert m.describe()["fallback"] is True
    # the fallback says why, and what to do
    assert "no CUDAExecutionProvider: install onnxruntime-gpu" in caplog.text


# --------------------------------------------------------------------------- concurrency


def _parallel_uploads(svc, payloads: list[bytes]) -> list:
    with cf.ThreadPoolExecutor(max_workers=25) as pool:
        return list(pool.map(lambda d: svc.upload(d), payloads))


def _concurrency(svc) -> None:
    before = {s.id for s in svc.store.list_studies(None, limit=10000)}
    distinct = [dicom_bytes(px) for px in synth_pixels(50, seed=600)]
    rs = _parallel_uploads(svc, distinct)
    assert [r.status_code for r in rs] == [202] * 50, {r.status_code: r.text for r in rs}
    after = {s.id for s in svc.store.list_studies(None, limit=10000)}
    assert len(after - before) == 50
    (px,) = synth_pixels(1, seed=700)
    same = dicom_bytes(px)
    rs = _parallel_uploads(svc, [same] * 50)
    assert {r.status_code for r in rs} == {202}
    assert len({r.json()["id"] for r in rs}) == 1
    assert len({s.id for s in svc.store.list_studies(None, limit=10000)} - after) == 1
    svc.wait(rs[0].json()["id"])


def test_concurrent_uploads_sqlite(service):
    _concurrency(service)


@pytest.fixture
def pg_url():
    yield from pg_schema_url()


def test_concurrent_uploads_postgresql(cxr_model, tmp_path, pg_url):
    cfg = serve_config(cxr_model, tmp_path / "serve", database_url=pg_url)
    with running_service(cfg) as svc:
        assert svc.store.dialect == "postgresql"
        _concurrency(svc)


# --------------------------------------------------------------------------- back-pressure


def test_rate_limit_queue_full_and_disk_reserve(cxr_model, tmp_path):
    a, b, c, d = (dicom_bytes(px) for px in synth_pixels(4, seed=800))
    cfg = serve_config(cxr_model, tmp_path / "rate", limits={"rate_per_minute": 2})
    with running_service(cfg) as svc:
        assert svc.upload(a).status_code == 202
        assert svc.upload(b).status_code == 202
        r = svc.upload(c)
        assert r.status_code == 429 and r.json()["code"] == "rate_limited"
        assert int(r.headers["retry-after"]) >= 1
        assert svc.upload(c, key=svc.other_clinic).status_code == 202  # per clinic
    cfg = serve_config(
        cxr_model, tmp_path / "queue", limits={"max_queue": 1}, worker={"in_process": False}
    )
    with running_service(cfg) as svc:
        assert svc.upload(a).status_code == 202
        r = svc.upload(b)
        assert r.status_code == 503 and r.json()["code"] == "queue_full"
        assert r.headers["retry-after"]
    cfg = serve_config(cxr_model, tmp_path / "disk", limits={"disk_reserve_mb": 1e12})
    with running_service(cfg) as svc:
        r = svc.upload(d)
        assert r.status_code == 507 and r.json()["code"] == "insufficient_storage"
        import httpx

        ready = httpx.get(f"{svc.url}/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"


# --------------------------------------------------------------------------- malformed requests


def _raw(service, body: bytes, boundary: str = "XyZ") -> object:
    import httpx

    return httpx.post(
        f"{service.url}/v1/studies",
        content=body,
        headers=service.headers(
            service.submitter, **{"Content-Type": f"multipart/form-data; boundary={boundary}"}
        ),
        timeout=60,
    )


def test_multipart_cut_short_is_refused(service):
    (px,) = synth_pixels(1, seed=900)
    png = png_bytes(px)
    head = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    r = _raw(service, head + png)  # no closing boundary: the connection dropped mid-upload
    assert r.status_code == 400 and r.json()["code"] == "incomplete_upload"
    r = _raw(service, head + png + b"\r\n--XyZ--\r\n")
    assert r.status_code == 202, r.text


def test_many_form_fields_are_refused(service):
    fields = b"".join(
        b'--XyZ\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(40)
    )
    r = _raw(service, fields + b"--XyZ--\r\n")
    assert r.status_code == 400 and r.json()["code"] == "too_many_fields"


def test_refused_uploads_are_audited_and_counted(service):
    r = service.upload(b"", filename="x.dcm")
    assert r.status_code == 400
    refused = [a for a in service.store.audit_rows("empty_file") if a.action == "upload.refused"]
    assert refused
    text = service.get("/metrics", service.admin).text
    assert 'diagnostics_upload_refusals_total{code="empty_file"}' in text


def test_file_in_the_wrong_field(service):
    import httpx

    (px,) = synth_pixels(1, seed=903)
    r = httpx.post(
        f"{service.url}/v1/studies",
        files={"image": ("a.dcm", dicom_bytes(px))},
        headers=service.headers(service.submitter),
    )
    assert r.status_code == 400 and r.json()["code"] == "missing_file"
    assert "'file'" in r.json()["detail"]


def test_not_multipart_and_missing_file(service):
    import httpx

    r = httpx.post(
        f"{service.url}/v1/studies",
        content=b"raw",
        headers=service.headers(service.submitter, **{"Content-Type": "application/octet-stream"}),
    )
    assert r.status_code == 400 and r.json()["code"] == "not_multipart"
    r = _raw(service, b'--XyZ\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--XyZ--\r\n')
    assert r.status_code == 400 and r.json()["code"] == "missing_file"


def test_overlong_sop_instance_uid_is_refused(service):
    (px,) = synth_pixels(1, seed=901)
    data = dicom_bytes(px, SOPInstanceUID="1." + "2" * 70)
    r = service.upload(data)
    assert r.status_code == 422 and r.json()["code"] == "invalid_uid"


def test_since_filter_honours_the_offset(service):
    from datetime import UTC, datetime, timedelta, timezone

    (px,) = synth_pixels(1, seed=902)
    sid = service.upload(dicom_bytes(px)).json()["id"]
    import httpx

    def listed(since: datetime) -> set[str]:
        r = httpx.get(
            f"{service.url}/v1/studies",
            params={"since": since.isoformat()},
            headers=service.headers(service.submitter),
        )
        assert r.status_code == 200, r.text
        return {s["id"] for s in r.json()["studies"]}

    now_hanoi = datetime.now(UTC).astimezone(timezone(timedelta(hours=7)))  # UTC+07:00
    assert sid in listed(now_hanoi - timedelta(minutes=5))
    assert sid not in listed(now_hanoi + timedelta(minutes=5))
    bad = httpx.get(
        f"{service.url}/v1/studies",
        params={"status": "weird"},
        headers=service.headers(service.submitter),
    )
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_status"
