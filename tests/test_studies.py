"""Studies of several images: grouping by Study Instance UID, the quiet period, marking a study
complete, per-image refusals, the aggregation rule, late images, and the worklist's maximum
wait. Real service (uvicorn on loopback, SQLite, the ONNX fixture model)."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx
import pytest
from service_support import dicom_bytes, running_service, serve_config, synth_pixels


def _study_uid(seed: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[seed, "study"])


def _image(seed: int, study: str, view: str = "PA") -> bytes:
    (px,) = synth_pixels(1, seed=seed)
    return dicom_bytes(px, StudyInstanceUID=study, ViewPosition=view)


def _post(svc, path: str, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{svc.url}{path}",
        files={"file": ("image.dcm", data, "application/dicom")},
        headers=svc.headers(svc.submitter),
        timeout=60,
    )


@pytest.fixture(scope="module")
def service(cxr_model, tmp_path_factory):
    cfg = serve_config(
        cxr_model,
        tmp_path_factory.mktemp("studies") / "serve",
        # 3 s: an open study must still be open after a POST and a GET on a loaded 2-core machine
        studies={"quiet_period_s": 3.0, "max_instances": 3},
        triage={"max_wait_minutes": 240, "clinics": {"clinic-a": 30}},
    )
    with running_service(cfg) as svc:
        yield svc


def test_an_open_study_collects_images_and_is_scored_when_marked_complete(service):
    uid = _study_uid("complete")
    first = _post(service, "/v1/studies?complete=false", _image(700, uid))
    assert first.status_code == 202, first.text
    sid = first.json()["id"]
    time.sleep(0.3)
    assert service.get(f"/v1/studies/{sid}").json()["status"] == "received"  # still open
    lateral = _post(service, f"/v1/studies/{sid}/instances", _image(701, uid, view="LL"))
    assert lateral.status_code == 202 and lateral.json()["id"] == sid
    done = httpx.post(
        f"{service.url}/v1/studies/{sid}/complete", headers=service.headers(service.submitter)
    )
    assert done.status_code == 202
    doc = service.wait(sid)
    # the lateral is refused on its own; the study is scored from the frontal image
    assert doc["status"] == "scored", doc
    images = {i["view"]: i for i in doc["images"]}
    assert images["PA"]["status"] == "scored"
    assert images["LL"]["status"] == "failed_qc" and images["LL"]["code"] == "view_not_frontal"
    assert doc["instance_count"] == 2
    for f in doc["findings"]:  # each finding keeps its one scored image's part
        assert [i["instance_id"] for i in f["images"]] == [images["PA"]["id"]]
    # the reports for the HIS say what each image was, and name the study's DICOM UIDs
    text = service.get(f"/v1/studies/{sid}/report?format=text", key=service.reviewer).text
    assert "Image 2 (LL): Lateral view: not scored" in text, text
    vi = service.get(f"/v1/studies/{sid}/report?format=text&lang=vi", key=service.reviewer).text
    assert "Ảnh 2 (LL): Phim nghiêng" in vi
    fhir = service.get(f"/v1/studies/{sid}/report", key=service.reviewer).json()
    uids = [
        (i["type"]["text"], i["value"])
        for i in fhir["identifier"]
        if i["system"] == "urn:dicom:uid"
    ]
    assert uids[0] == ("Study Instance UID", f"urn:oid:{uid}")
    assert [k for k, _ in uids[1:]] == ["SOP Instance UID"] * 2  # then its two images
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    DiagnosticReport.model_validate(fhir)
    # a closed study takes no more images over HTTP
    late = _post(service, f"/v1/studies/{sid}/instances", _image(702, uid))
    assert late.status_code == 409 and late.json()["code"] == "study_closed"
    # another clinic cannot add to it or complete it
    other = httpx.post(
        f"{service.url}/v1/studies/{sid}/complete", headers=service.headers(service.other_clinic)
    )
    assert other.status_code == 404


def test_dicom_images_of_one_study_are_grouped_and_scored_after_the_quiet_period(service):
    uid = _study_uid("quiet")
    sent = [_image(seed, uid) for seed in (710, 711)]
    # two frontal images, as the receiver hands them over
    results = [_ingest(service, data) for data in sent]
    assert results[0].study.id == results[1].study.id
    sid = results[0].study.id
    assert service.store.get_study(sid).status == "received"
    service.app.state.worker.wake.set()
    doc = service.wait(sid, timeout=30)  # the quiet period (3 s) ends, then it is scored
    assert doc["status"] == "scored" and doc["instance_count"] == 2
    by_id = {i["id"]: i for i in doc["images"]}
    assert all(i["status"] == "scored" for i in by_id.values())
    for f in doc["findings"]:  # the rule: highest probability, positive if any image is
        parts = f["images"]
        assert len(parts) == 2
        assert f["probability"] == max(p["probability"] for p in parts)
        assert f["positive"] == any(p["positive"] for p in parts)
    # the same instance again: the same study, nothing new
    again = _ingest(service, sent[0])
    assert not again.created and again.study.id == sid
    # a new image of the scored study: kept as late, never scored
    late = _ingest(service, _image(712, uid))
    assert late.late and late.study.id == sid
    statuses = [i.status for i in service.store.study_instances(sid)]
    assert statuses == ["scored", "scored", "late"]


def test_a_single_http_upload_is_still_a_study_of_one_image_scored_at_once(service):
    r = service.upload(_image(720, _study_uid("single")))
    assert r.status_code == 202
    doc = service.wait(r.json()["id"], timeout=30)
    assert doc["status"] == "scored" and doc["instance_count"] == 1
    # a lateral alone is refused at once, as before
    r = service.upload(_image(721, _study_uid("single-lat"), view="LL"))
    assert r.status_code == 422 and r.json()["code"] == "view_not_frontal"


def test_a_study_of_only_laterals_fails_qc_with_the_images_reason(service):
    uid = _study_uid("laterals")
    r = _post(service, "/v1/studies?complete=false", _image(730, uid, view="LL"))
    sid = r.json()["id"]
    httpx.post(
        f"{service.url}/v1/studies/{sid}/complete", headers=service.headers(service.submitter)
    )
    doc = service.wait(sid)
    assert doc["status"] == "failed_qc" and doc["error_code"] == "view_not_frontal"


def test_a_study_has_a_limit_of_images(service):
    uid = _study_uid("limit")
    sid = _post(service, "/v1/studies?complete=false", _image(740, uid)).json()["id"]
    for seed in (741, 742):
        assert _post(service, f"/v1/studies/{sid}/instances", _image(seed, uid)).status_code == 202
    r = _post(service, f"/v1/studies/{sid}/instances", _image(743, uid))
    assert r.status_code == 409 and r.json()["code"] == "too_many_instances"


def test_a_negative_study_rises_to_the_top_once_it_waited_past_its_sites_limit(service):
    """The maximum wait is per site (clinic-a: 30 minutes here, the default 240). A study the
    AI called negative goes above every AI-positive one once it has waited that long
    unreviewed, so a false negative is never read last."""
    from sqlalchemy import update

    from diagnostics.serve.store import MaxWait, Study, now

    store = service.store
    ids = []
    for seed in (750, 751, 752):
        r = service.upload(_image(seed, _study_uid(f"wait-{seed}")))
        ids.append(service.wait(r.json()["id"])["id"])
    items, _ = store.browse(None, clinic="clinic-a", per_page=100)
    wait = MaxWait(240, {"clinic-a": 30})
    before = [
        i["id"] for i in store.browse(None, clinic="clinic-a", per_page=100, max_wait=wait)[0]
    ]
    assert before == [i["id"] for i in items]  # nothing has waited yet: the AI's order
    last = [i for i in before if i in ids][-1]  # of this test's studies, the AI ranks it lowest
    with store.write_engine.begin() as conn:  # it arrived 31 minutes ago
        conn.execute(
            update(Study).where(Study.id == last).values(created_at=now() - timedelta(minutes=31))
        )
    after, _ = store.browse(None, clinic="clinic-a", per_page=100, max_wait=wait)
    assert after[0]["id"] == last and after[0]["overdue"]
    assert not any(i["overdue"] for i in after[1:])
    # under the default limit (240 minutes) it would not have moved
    default_only, _ = store.browse(None, clinic="clinic-a", per_page=100, max_wait=MaxWait(240, {}))
    assert default_only[0]["id"] != last or len(default_only) == 1
    # the API worklist applies the same rule, from the service's config
    r = service.get("/v1/worklist", key=service.reviewer)
    assert r.json()["studies"][0]["id"] == last
    # once reviewed, it is no longer overdue
    view = store.study_view(last)
    body = {"reviews": [{"finding_id": f["id"], "verdict": "agree"} for f in view["findings"]]}
    r = httpx.post(
        f"{service.url}/v1/studies/{last}/reviews",
        json=body,
        headers=service.headers(service.reviewer),
    )
    assert r.status_code == 201, r.text
    after, _ = store.browse(None, clinic="clinic-a", per_page=100, max_wait=wait)
    assert not next(i for i in after if i["id"] == last)["overdue"]


def _ingest(service, data: bytes, source: str = "dicom"):
    import hashlib

    from diagnostics.serve.intake import ingest
    from diagnostics.serve.upload import ReceivedFile

    temp = service.store.blobs.temp_file()
    temp.write_bytes(data)
    got = ReceivedFile(temp, len(data), hashlib.sha256(data).hexdigest(), data[:132], "")
    return ingest(
        service.app.state.cfg, service.store, got, clinic="clinic-a", actor="t", source=source
    )


def test_a_frontal_image_after_a_study_of_laterals_failed_opens_it_again(service):
    """A PACS may forward the lateral first and the PA minutes later: the study that failed
    QC with only its lateral is scored again with the PA, never left unread."""
    uid = _study_uid("reopen")
    first = _ingest(service, _image(760, uid, view="LL"))
    service.app.state.worker.wake.set()
    doc = service.wait(first.study.id, timeout=30)
    assert doc["status"] == "failed_qc" and doc["error_code"] == "view_not_frontal"
    again = _ingest(service, _image(761, uid))
    assert again.study.id == first.study.id and not again.late
    service.app.state.worker.wake.set()
    doc = service.wait(first.study.id, timeout=30)
    assert doc["status"] == "scored", doc
    assert {i["view"]: i["status"] for i in doc["images"]} == {"LL": "failed_qc", "PA": "scored"}
    actions = [a.action for a in service.store.audit_rows(first.study.id)]
    assert "study.reopened" in actions


def test_an_image_of_one_study_sent_into_another_is_a_conflict(service):
    uid = _study_uid("other-study")
    data = _image(770, uid)
    a = _post(service, "/v1/studies?complete=false", data).json()["id"]
    b = _post(service, "/v1/studies?complete=false", _image(771, _study_uid("other-2"))).json()
    r = _post(service, f"/v1/studies/{b['id']}/instances", data)
    assert r.status_code == 409 and r.json()["code"] == "instance_in_other_study"
    assert a != b["id"]


def test_aggregation_rule_for_flagged_and_refused_images():
    """The rule in aggregate.py, on results as the Scorer makes them."""
    from types import SimpleNamespace

    from diagnostics.serve.aggregate import aggregate
    from diagnostics.serve.runner import ScoreResult

    def image(i, view="PA"):
        return SimpleNamespace(id=f"i{i}", position=i, view=view)

    def row(label, p, positive, heat=None):
        return {
            "label": label,
            "probability": p,
            "threshold": 0.5,
            "positive": positive,
            "heatmap": heat,
            "logit": 0.0,
        }

    inside = ScoreResult("scored", population={"inside": True})
    flagged = ScoreResult(
        "scored",
        flags=["outside_intended_population"],
        message="adult",
        population={"inside": False},
    )
    # two frontal images: max probability, positive if any, heatmap of the top image
    out = aggregate(
        [(image(1), inside), (image(2), inside)],
        [[row("A", 0.7, True, "1_A.png")], [row("A", 0.9, True, "2_A.png")]],
    )
    (f,) = out.findings
    assert (f["probability"], f["positive"], f["heatmap"]) == (0.9, True, "2_A.png")
    assert [p["probability"] for p in f["images"]] == [0.7, 0.9]
    out = aggregate(
        [(image(1), inside), (image(2), inside)],
        [[row("A", 0.2, False)], [row("A", 0.9, True, "2_A.png")]],
    )
    assert out.findings[0]["positive"] is True
    # one image flagged outside the population: no call for the study, and its document says
    # why (the flagged image's), even though the other image scores higher
    out = aggregate(
        [(image(1), flagged), (image(2), inside)],
        [[row("A", 0.3, None)], [row("A", 0.9, True, "2_A.png")]],
    )
    assert out.flag == "outside_intended_population"
    assert out.findings[0]["positive"] is None and out.findings[0]["heatmap"] is None
    assert out.result["population"] == {"inside": False} and out.result["message"] == "adult"
    # a site that refuses: one image refused for the population refuses the study
    refused = ScoreResult("failed_qc", code="outside_intended_population", message="adult")
    out = aggregate([(image(1), refused), (image(2), inside)], [[], [row("A", 0.9, True)]])
    assert (out.status, out.code, out.findings) == ("failed_qc", "outside_intended_population", [])
    # only a lateral: failed_qc with its code
    lateral = ScoreResult("failed_qc", code="view_not_frontal", message="lateral")
    out = aggregate([(image(1, "LL"), lateral)], [[]])
    assert (out.status, out.code) == ("failed_qc", "view_not_frontal")
