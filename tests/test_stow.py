"""DICOMweb STOW-RS: the multipart/related parser on crafted bodies, then the real service under
uvicorn, driven by a real DICOMweb client (dicomweb-client) and by raw requests."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
from service_support import dicom_bytes, running_service, serve_config, synth_pixels

from diagnostics.serve.upload import UploadError
from diagnostics.serve.upload_related import RelatedPart, receive_parts

CT = 'multipart/related; type="application/dicom"; boundary=XyZ'
FAILED, REFERENCED, REASON, INSTANCE = "00081198", "00081199", "00081197", "00081155"


def related(
    *parts: tuple[bytes, str | None], boundary: bytes = b"XyZ", close: bool = True
) -> bytes:
    """A multipart/related body: (bytes, the part's Content-Type or None for none)."""
    out = b""
    for data, ctype in parts:
        out += b"\r\n--" + boundary + b"\r\n"
        out += f"Content-Type: {ctype}\r\n".encode() if ctype else b""
        out += b"\r\n" + data
    return out + (b"\r\n--" + boundary + b"--\r\n" if close else b"")


# --------------------------------------------------------------------------- the parser


def _parse(
    tmp_path: Path, content_type: str, body: bytes, chunk: int = 7, **caps: int
) -> list[RelatedPart]:
    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(body), chunk):  # small pieces: boundaries split across them
            yield body[i : i + chunk]

    n = iter(range(1000))
    limits = {"max_part_bytes": 1 << 20, "max_total_bytes": 1 << 21, **caps}
    return asyncio.run(
        receive_parts(content_type, stream(), lambda: tmp_path / f"{next(n)}.part", **limits)
    )


def _refusal(tmp_path: Path, content_type: str, body: bytes, **caps: int) -> UploadError:
    with pytest.raises(UploadError) as info:
        _parse(tmp_path, content_type, body, **caps)
    assert not list(tmp_path.glob("*.part"))  # a failed request leaves no temp file
    return info.value


@pytest.mark.parametrize(
    "content_type",
    [
        CT,
        "multipart/related; type=application/dicom; boundary=XyZ",
        'Multipart/Related; Type="Application/DICOM"; Boundary="XyZ"',
        "multipart/related; boundary=XyZ",  # no type: each part's own type decides
    ],
)
def test_parts_are_streamed_to_their_own_files(tmp_path, content_type):
    one, two = b"\0" * 128 + b"DICM" + b"a" * 300, b"\0" * 128 + b"DICM" + b"\r\n--Xy" * 50
    parts = _parse(
        tmp_path,
        content_type,
        related((one, "application/dicom"), (two, 'application/dicom; transfer-syntax="1.2"')),
    )
    assert [p.refusal for p in parts] == [None, None]
    for part, data in zip(parts, (one, two), strict=True):
        got = part.file
        assert got is not None and got.path.read_bytes() == data and got.size == len(data)
        assert got.sha256 == hashlib.sha256(data).hexdigest() and got.head == data[:132]
    assert parts[0].file.path != parts[1].file.path


def test_a_part_of_another_type_fails_alone(tmp_path):
    good = b"\0" * 128 + b"DICM" + b"x" * 10
    parts = _parse(
        tmp_path,
        CT,
        related((b"{}", "application/dicom+json"), (good, "application/dicom"), (b"z", None)),
    )
    assert parts[0].file is None and parts[0].refusal.status == 415
    assert parts[0].refusal.code == "part_not_dicom"
    assert parts[1].file is not None and parts[1].file.path.read_bytes() == good
    assert parts[2].file is None and "without a Content-Type" in parts[2].refusal.message
    assert len(list(tmp_path.glob("*.part"))) == 1  # refused parts are never written


def test_request_level_refusals(tmp_path):
    body = related((b"x", "application/dicom"))
    bad_type = _refusal(
        tmp_path, 'multipart/related; type="application/dicom+json"; boundary=XyZ', body
    )
    assert bad_type.status == 415 and "not supported" in bad_type.message
    assert _refusal(tmp_path, "multipart/form-data; boundary=XyZ", body).status == 415
    assert _refusal(tmp_path, "application/dicom", body).status == 415
    assert _refusal(tmp_path, 'multipart/related; type="application/dicom"', body).status == 400
    long = "b" * 71
    assert _refusal(tmp_path, CT.replace("XyZ", long), body).code == "bad_multipart"


def test_malformed_and_cut_short_bodies(tmp_path):
    dcm = b"\0" * 128 + b"DICM" + b"y" * 50
    cut = _refusal(tmp_path, CT, related((dcm, "application/dicom"), close=False))
    assert (cut.status, cut.code) == (400, "incomplete_upload")
    # the first part complete, the second cut short: neither file is kept
    two = related((dcm, "application/dicom"), (dcm, "application/dicom"))[:-20]
    assert _refusal(tmp_path, CT, two).code == "incomplete_upload"
    assert _refusal(tmp_path, CT, b"garbage\r\n--XyZ--\r\n").code == "bad_multipart"
    assert _refusal(tmp_path, CT, b"--XyZ--\r\n").code == "no_instances"
    assert _refusal(tmp_path, CT, b"").code == "incomplete_upload"


def test_caps_refuse_mid_stream(tmp_path):
    dcm = b"\0" * 128 + b"DICM" + b"z" * 1000
    body = related((dcm[:200], "application/dicom"), (dcm, "application/dicom"))
    too_big = _refusal(tmp_path, CT, body, max_part_bytes=500)
    assert (too_big.status, too_big.code) == (413, "upload_too_large")
    assert _refusal(tmp_path, CT, body, max_total_bytes=900).status == 413
    many = related(*[(dcm[:140], "application/dicom")] * 4)
    assert _refusal(tmp_path, CT, many, max_parts=3).code == "too_many_parts"


def test_a_disconnect_leaves_no_temp_file(tmp_path):
    from starlette.requests import ClientDisconnect

    body = related((b"\0" * 128 + b"DICM" + b"w" * 400, "application/dicom"))

    async def stream() -> AsyncIterator[bytes]:
        yield body[:300]
        raise ClientDisconnect()

    with pytest.raises(ClientDisconnect):
        asyncio.run(
            receive_parts(
                CT,
                stream(),
                lambda: tmp_path / "a.part",
                max_part_bytes=1 << 20,
                max_total_bytes=1 << 20,
            )
        )
    assert not list(tmp_path.glob("*.part"))


def test_failure_reasons():
    from diagnostics.serve.api.dicomweb import failure_reason

    assert failure_reason(507, "insufficient_storage") == 0xA700
    assert failure_reason(422, "modality_not_supported") == 0xC000
    assert failure_reason(415, "part_not_dicom") == 0xC000
    assert failure_reason(409, "study_uid_mismatch") == 0xA900
    assert failure_reason(409, "too_many_instances") == 0xC000
    assert failure_reason(503, "upload_expired") == 0xA700  # busy: the sender may retry
    assert failure_reason(500, "processing_error") == 0x0110


# --------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def service(cxr_model, tmp_path_factory):
    cfg = serve_config(
        cxr_model,
        tmp_path_factory.mktemp("stow") / "serve",
        # 51 KB a part: the parser's 413 comes before admission's; bodies of other routes are
        # capped at 16 KB, which a STOW-RS request may pass (it has its own caps)
        limits={"max_upload_mb": 0.05, "max_body_kb": 16},
        studies={"quiet_period_s": 0.5},
    )
    with running_service(cfg) as svc:
        yield svc


def _dataset(seed: int, study: str, **changes):
    import pydicom

    (px,) = synth_pixels(1, seed=seed)
    return pydicom.dcmread(io.BytesIO(dicom_bytes(px, StudyInstanceUID=study, **changes)))


def _encoded(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _stow(svc, instances: Iterable, path: str = "/dicomweb/studies", **headers: str):
    """POST instances (datasets, or bytes as they are) as one STOW-RS request."""
    import httpx

    ctype = headers.pop("content_type", CT)
    body = related(
        *[(i if isinstance(i, bytes) else _encoded(i), "application/dicom") for i in instances]
    )
    return httpx.post(
        f"{svc.url}{path}",
        content=body,
        headers=svc.headers(svc.submitter, **{"Content-Type": ctype}, **headers),
        timeout=60,
    )


def _uids(doc: dict, tag: str) -> list[str]:
    return [item[INSTANCE]["Value"][0] for item in doc.get(tag, {}).get("Value", [])]


def _no_temp_files(svc) -> bool:
    return not list((svc.data_dir / "blobs" / "tmp").glob("*.part"))


def test_a_dicomweb_client_stores_a_study_that_is_then_scored(service):
    import requests
    from dicomweb_client import DICOMwebClient

    ds1, ds2 = _dataset(600, "1.2.826.0.1.600"), _dataset(601, "1.2.826.0.1.600")
    session, statuses = requests.Session(), []
    session.hooks["response"].append(lambda r, *a, **k: statuses.append(r.status_code))
    client = DICOMwebClient(
        url=f"{service.url}/dicomweb",
        session=session,
        headers={"Authorization": f"Bearer {service.submitter}"},
    )
    result = client.store_instances([ds1, ds2])
    assert statuses == [200]
    assert "FailedSOPSequence" not in result
    assert {i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence} == {
        ds1.SOPInstanceUID,
        ds2.SOPInstanceUID,
    }
    assert {i.ReferencedSOPClassUID for i in result.ReferencedSOPSequence} == {ds1.SOPClassUID}
    one = service.store.find_instance("clinic-a", "", ds1.SOPInstanceUID)
    two = service.store.find_instance("clinic-a", "", ds2.SOPInstanceUID)
    assert one.study_id == two.study_id and one.source == "stow"
    assert len(service.store.study_instances(one.study_id)) == 2
    assert service.wait(one.study_id)["status"] == "scored"  # after its quiet period

    r = _stow(service, [ds1])  # the same instance again: stored already, nothing added
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    assert _uids(r.json(), REFERENCED) == [ds1.SOPInstanceUID] and FAILED not in r.json()
    assert len(service.store.study_instances(one.study_id)) == 2
    assert service.store.find_instance("clinic-a", "", ds1.SOPInstanceUID).id == one.id


def test_one_stored_one_refused_is_202(service, caplog):
    good, mr = _dataset(610, "1.2.826.0.1.610"), _dataset(611, "1.2.826.0.1.610", Modality="MR")
    with caplog.at_level(logging.DEBUG):
        r = _stow(service, [good, mr])
    assert "stow: 1 stored, 1 failed (modality_not_supported)" in caplog.text
    for uid in (good.SOPInstanceUID, mr.SOPInstanceUID, good.StudyInstanceUID):
        assert uid not in caplog.text  # UIDs identify patients' images: never logged
    assert r.status_code == 202, r.text
    doc = r.json()
    assert _uids(doc, REFERENCED) == [good.SOPInstanceUID]
    (failed,) = doc[FAILED]["Value"]
    assert failed[INSTANCE]["Value"] == [mr.SOPInstanceUID]
    assert failed["00081150"]["Value"] == [mr.SOPClassUID]
    assert failed[REASON] == {"vr": "US", "Value": [0xC000]}
    assert service.store.find_instance("clinic-a", "", mr.SOPInstanceUID) is None
    refused = service.store.audit_rows("modality_not_supported")
    assert any(a.action == "stow.refused" for a in refused)
    text = service.get("/metrics", service.admin).text
    assert 'diagnostics_upload_refusals_total{code="modality_not_supported"}' in text


def test_all_refused_is_409(service):
    a = _dataset(620, "1.2.826.0.1.620", Modality="MR")
    b = _dataset(621, "1.2.826.0.1.620", Modality="CT")
    r = _stow(service, [a, b])
    assert r.status_code == 409, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    assert REFERENCED not in r.json()
    assert _uids(r.json(), FAILED) == [a.SOPInstanceUID, b.SOPInstanceUID]


def test_study_uid_in_the_url_must_match(service):
    study = "1.2.826.0.1.630"
    inside, outside = _dataset(630, study), _dataset(631, "1.2.826.0.1.631")
    r = _stow(service, [inside, outside], path=f"/dicomweb/studies/{study}")
    assert r.status_code == 202, r.text
    assert _uids(r.json(), REFERENCED) == [inside.SOPInstanceUID]
    (failed,) = r.json()[FAILED]["Value"]
    assert failed[INSTANCE]["Value"] == [outside.SOPInstanceUID]
    assert failed[REASON]["Value"] == [0xA900]
    assert service.store.find_instance("clinic-a", "", outside.SOPInstanceUID) is None
    r = _stow(service, [inside], path="/dicomweb/studies/not-a-uid")
    assert r.status_code == 400 and r.json()["code"] == "bad_study_uid"


def test_request_refusals(service):
    import httpx

    ds = _dataset(640, "1.2.826.0.1.640")
    json_type = 'multipart/related; type="application/dicom+json"; boundary=XyZ'
    r = _stow(service, [ds], content_type=json_type)
    assert r.status_code == 415 and r.headers["content-type"] == "application/problem+json"
    assert "not supported" in r.json()["detail"]
    r = httpx.post(
        f"{service.url}/dicomweb/studies",
        content=related((_encoded(ds), "application/dicom")),
        headers={"Content-Type": CT},
    )
    assert r.status_code == 401
    r = httpx.post(
        f"{service.url}/dicomweb/studies",
        content=related((_encoded(ds), "application/dicom"), close=False),
        headers=service.headers(service.submitter, **{"Content-Type": CT}),
    )
    assert r.status_code == 400 and r.json()["code"] == "incomplete_upload"
    assert service.store.find_instance("clinic-a", "", ds.SOPInstanceUID) is None
    assert _no_temp_files(service)


def test_a_part_too_large_is_413_and_leaves_nothing(service):
    small = _dataset(650, "1.2.826.0.1.650")
    big = _encoded(_dataset(651, "1.2.826.0.1.650")) + b"\0" * 60_000  # over the 51 KB cap
    r = _stow(service, [small, big])  # under admission's cap on the whole body: cut mid-stream
    assert r.status_code == 413 and r.json()["code"] == "upload_too_large", r.text
    assert r.json()["detail"].startswith("An instance is larger")  # the part cap, mid-stream
    assert service.store.find_instance("clinic-a", "", small.SOPInstanceUID) is None
    assert _no_temp_files(service)


def test_stow_bodies_are_not_held_to_the_small_body_cap(service):
    study = "1.2.826.0.1.660"
    instances = [_dataset(660 + i, study) for i in range(3)]
    r = _stow(service, instances)  # about 27 KB: over max_body_kb, under the STOW caps
    assert r.status_code == 200, r.text
    assert len(_uids(r.json(), REFERENCED)) == 3
