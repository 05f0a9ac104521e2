"""Risk at the clinic (Order 10, part 4): `POST /v1/risk/{model}` with JSON records and FHIR
Bundles, stored and scored with the ONNX model, refusals with codes, outcomes recorded later,
agreement and calibration per site, the FHIR RiskAssessment out, and the same keys, roles,
audit and problem+json answers as the image API. A real uvicorn server, a real risk model
trained by the project on a synthetic table shaped as the OUCRU dengue file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.risk_support import train_synthetic_dengue
from tests.service_support import running_service, serve_config

PATIENT = "HOSP-PT-778899"  # a patient identifier: must never reach a log or an audit row


@pytest.fixture(scope="module")
def risk_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from diagnostics.serve.risk import RiskModel

    return RiskModel(train_synthetic_dengue(tmp_path_factory.mktemp("risk")))


@pytest.fixture
def svc(tmp_path: Path, cxr_model: Path, risk_model: Any):
    cfg = serve_config(cxr_model, tmp_path / "data", risk={"max_records": 50})
    with running_service(cfg, risk_models={"dengue": risk_model}) as service:
        yield service


@pytest.fixture
def pg_svc(tmp_path: Path, cxr_model: Path, risk_model: Any):
    from tests.service_support import pg_schema_url

    for url in pg_schema_url():
        cfg = serve_config(cxr_model, tmp_path / "data", database_url=url)
        with running_service(cfg, risk_models={"dengue": risk_model}) as service:
            yield service


def _post(svc: Any, body: Any, key: str | None = None, **headers: str) -> httpx.Response:
    ctype = headers.pop("content_type", "application/json")
    return httpx.post(
        f"{svc.url}/v1/risk/dengue",
        json=body,
        headers=svc.headers(key or svc.submitter, **{"Content-Type": ctype, **headers}),
        timeout=30,
    )


CHILD = {"StudyNo": PATIENT, "Age": 7, "WBC": 3.1, "PLT": 95, "DayDisease": 2, "Vomiting": 1}


def test_json_records_are_scored_refused_with_codes_and_stored(svc, caplog):
    caplog.set_level(logging.INFO)
    older = {**CHILD, "Age": 16}  # outside the intended population (1-15 years)
    no_wbc = {k: v for k, v in CHILD.items() if k != "WBC"}  # the model imputes it
    r = _post(svc, {"records": [CHILD, older, no_wbc]})
    assert r.status_code == 201, r.text
    scored, refused, imputed = r.json()["records"]
    assert scored["status"] == "scored" and 0 < scored["probability"] < 1
    assert scored["category"] in ("high", "low") and scored["imputed"] == []
    assert scored["probability"] == scored["raw_probability"]  # no site profile yet
    assert refused["status"] == "refused" and refused["probability"] is None
    assert refused["code"] == "outside_intended_population"
    assert refused["reasons"][0] == "Age: outside the intended population 1..15"
    assert imputed["imputed"] == ["WBC"]
    # stored: listed, readable, the record as sent kept as a blob
    listed = svc.get("/v1/risk/records").json()["records"]
    assert {x["id"] for x in listed} == {scored["id"], refused["id"], imputed["id"]}
    assert svc.get(scored["location"]).json()["probability"] == scored["probability"]
    assert svc.store.risk_document(scored["id"])["record"]["StudyNo"] == PATIENT
    # the same probability as scoring the record directly with the model
    import pandas as pd

    direct = svc.app.state.risk_models["dengue"].score(pd.DataFrame([CHILD]))
    assert abs(direct["risk"][0] - scored["probability"]) < 1e-12
    # audited by generated ID and code; the patient identifier is in no log and no audit row
    actions = [a.action for a in svc.store.audit_rows(refused["id"])]
    assert actions == ["risk.refused"]
    audit = " ".join(str(a.detail) + a.object_id for a in svc.store.audit_rows())
    assert PATIENT not in audit and PATIENT not in caplog.text


def test_bad_requests_are_problems_and_store_nothing(svc):
    cases = [
        (_post(svc, {"records": [{**CHILD, "PCR": 1}]}), 422, "unknown_field"),
        (_post(svc, {"records": [{**CHILD, "Age": {"v": 3}}]}), 422, "invalid_record"),
        (_post(svc, {"records": []}), 422, "no_records"),
        (_post(svc, {"records": [CHILD] * 51}), 413, "too_many_records"),
        (_post(svc, CHILD, content_type="text/csv"), 415, "unsupported_media_type"),
        (
            httpx.post(
                f"{svc.url}/v1/risk/dengue",
                content=b"{not json",
                headers=svc.headers(svc.submitter, **{"Content-Type": "application/json"}),
            ),
            400,
            "invalid_json",
        ),
        (
            httpx.post(f"{svc.url}/v1/risk/nope", json=CHILD, headers=svc.headers(svc.submitter)),
            404,
            "risk_model_not_found",
        ),
        (_post(svc, CHILD, key=svc.reviewer), 403, "role_forbidden"),
        (httpx.post(f"{svc.url}/v1/risk/dengue", json=CHILD), 401, "unauthenticated"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == code
    assert svc.store.list_risk_records(None) == []
    refused = [a for a in svc.store.audit_rows() if a.action == "risk.request_refused"]
    assert {a.object_id for a in refused} >= {"unknown_field", "too_many_records"}


def test_odd_bodies_are_problems_never_500(svc):
    def raw(body: bytes) -> httpx.Response:
        return httpx.post(
            f"{svc.url}/v1/risk/dengue",
            content=body,
            headers=svc.headers(svc.submitter, **{"Content-Type": "application/json"}),
        )

    cases = [
        (_post(svc, {}), 422, "invalid_record"),
        (_post(svc, {"records": {}}), 422, "invalid_record"),
        (_post(svc, [{**CHILD, "Age": True}]), 422, "invalid_record"),
        (_post(svc, [{**CHILD, "WBC": 10**400}]), 422, "invalid_record"),
        (raw(b'[{"Age": NaN}]'), 400, "invalid_json"),
        (raw(b"[" * 100000 + b"]" * 100000), 400, "invalid_json"),
        (svc.get("/v1/risk/records?since=9999-12-31T23:59-23:59"), 422, "invalid_request"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, (code, r.text)
        assert r.json()["code"] == code
    # a yes/no as a JSON boolean is the feature's own code (Vomiting: 1 yes / 2 no)
    as_bool = _post(svc, [{**CHILD, "Vomiting": True}]).json()["records"][0]
    as_code = _post(svc, [CHILD]).json()["records"][0]
    assert as_bool["probability"] == as_code["probability"]


def test_idempotency_key_and_clinic_isolation(svc):
    first = _post(svc, [CHILD], **{"Idempotency-Key": "his-42"})
    again = _post(svc, [CHILD], **{"Idempotency-Key": "his-42"})
    assert first.status_code == 201 and again.status_code == 200
    a, b = first.json()["records"][0], again.json()["records"][0]
    assert a["id"] == b["id"] and b["duplicate"] is True
    assert first.headers["location"] == a["location"]
    assert len(svc.store.list_risk_records(None)) == 1
    # the same key for another child (or another request shape) is a conflict, never a replay
    other = _post(svc, [{**CHILD, "WBC": 9.9}], **{"Idempotency-Key": "his-42"})
    assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused"
    assert len(svc.store.list_risk_records(None)) == 1
    assert "risk.duplicate" in [x.action for x in svc.store.audit_rows(a["id"])]
    # another clinic sees nothing of it, whether or not it exists
    other = svc.get(f"/v1/risk/records/{a['id']}", key=svc.other_clinic)
    assert other.status_code == 404 and other.json()["code"] == "risk_record_not_found"
    assert svc.get("/v1/risk/records", key=svc.other_clinic).json()["records"] == []


def test_outcomes_then_agreement_and_calibration_per_site_on_postgresql(pg_svc, risk_model):
    assert pg_svc.store.dialect == "postgresql"
    test_outcomes_then_agreement_and_calibration_per_site(pg_svc, risk_model)
    # the worklist order (awaiting an outcome, high first) and `since` with an offset
    _post(pg_svc, [CHILD, {**CHILD, "WBC": 12.0, "PLT": 320}])
    waiting = pg_svc.get("/v1/risk/records?awaiting_outcome=true").json()["records"]
    categories = [r["category"] for r in waiting]
    assert categories == sorted(categories)  # "high" < "low"
    since = pg_svc.get("/v1/risk/records?since=2000-01-01T07:00:00%2B07:00").json()["records"]
    assert len(since) == len(pg_svc.store.list_risk_records(None))


def test_outcomes_then_agreement_and_calibration_per_site(svc, risk_model):
    import numpy as np

    from tests.risk_support import synthetic_dengue

    table = synthetic_dengue(50, seed=5)
    records = table.drop(columns=["SiteNo", "Lab_Confirmed_Dengue"]).to_dict("records")
    r = _post(svc, {"records": records})
    assert r.status_code == 201, r.text
    got = r.json()["records"]
    truth = table["Lab_Confirmed_Dengue"].to_numpy() == 1
    rev = svc.headers(svc.reviewer)
    for rec, dengue in zip(got, truth, strict=True):
        if rec["status"] != "scored":
            continue
        body = {"outcome": "confirmed" if dengue else "ruled_out", "note": "PCR"}
        out = httpx.post(f"{svc.url}{rec['location']}/outcome", json=body, headers=rev)
        assert out.status_code == 201, out.text
        assert out.json()["outcome"]["value"] == bool(dengue)
    # a submitter cannot record outcomes; an unknown outcome word is a 422
    bad = httpx.post(
        f"{svc.url}{got[0]['location']}/outcome",
        json={"outcome": "confirmed"},
        headers=svc.headers(svc.submitter),
    )
    assert bad.status_code == 403
    bad = httpx.post(f"{svc.url}{got[0]['location']}/outcome", json={"outcome": "yes"}, headers=rev)
    assert bad.status_code == 422
    sites = svc.get("/v1/risk/agreement", key=svc.reviewer).json()["sites"]
    (row,) = sites
    scored = [g for g in got if g["status"] == "scored"]
    assert row["clinic"] == "clinic-a" and row["n"] == len(scored)
    y = np.array([t for g, t in zip(got, truth, strict=True) if g["status"] == "scored"])
    high = np.array([g["category"] == "high" for g in scored])
    assert row["agreement"] == pytest.approx(float((high == y).mean()))
    assert row["auroc"] > 0.6 and row["calibration_slope"] is not None
    assert svc.get("/v1/risk/records?awaiting_outcome=true").json()["records"] == []
    # the site's recalibration from those outcomes, then applied to its next records
    import json

    from typer.testing import CliRunner

    from diagnostics.cli import app

    config = svc.data_dir.parent / "serve.json"
    config.write_text(json.dumps(svc.app.state.cfg.model_dump(mode="json")))
    args = ["models", "recalibrate", str(risk_model.path), "--site", "clinic-a"]
    args += ["--from-outcomes", "--min-cases", "5", "--serve-config", str(config)]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "calibration intercept" in out.output
    profile = svc.store.site_profile(risk_model.sha256, "clinic-a")
    assert profile.evidence["dengue"]["source"] == "recorded outcomes"
    nxt = _post(svc, [CHILD]).json()["records"][0]
    assert nxt["profile_id"] == profile.id


def test_refused_record_takes_no_outcome(svc):
    rec = _post(svc, [{**CHILD, "DayDisease": 5}]).json()["records"][0]
    assert rec["code"] == "outside_intended_population"
    r = httpx.post(
        f"{svc.url}{rec['location']}/outcome",
        json={"outcome": "confirmed"},
        headers=svc.headers(svc.reviewer),
    )
    assert r.status_code == 409 and r.json()["code"] == "record_refused"


def test_site_profile_recalibrates_the_clinics_records(svc, risk_model):
    before = _post(svc, [CHILD]).json()["records"][0]
    profile = svc.store.save_profile(
        model_sha256=risk_model.sha256,
        site="clinic-a",
        temperatures={"dengue": 2.0},
        intercepts={"dengue": -0.5},
        thresholds={"dengue": 0.3},
        policy="youden",
        evidence={},
        population_threshold=None,
        created_by="test",
    )
    after = _post(svc, [CHILD]).json()["records"][0]
    assert after["profile_id"] == profile.id and after["threshold"] == 0.3
    assert after["raw_probability"] == pytest.approx(before["probability"])
    import math

    z = math.log(before["probability"] / (1 - before["probability"]))
    expected = 1 / (1 + math.exp(-(z / 2.0 - 0.5)))
    assert after["probability"] == pytest.approx(expected, abs=1e-9)
    assert after["category"] == ("high" if after["probability"] >= 0.3 else "low")


def test_fhir_bundle_in_risk_assessment_out(svc):
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.operationoutcome import OperationOutcome
    from fhir.resources.R4B.riskassessment import RiskAssessment

    bundle = _bundle(age_birthdate="2019-03-01", when="2026-11-30T08:00:00+07:00")
    r = _post(svc, bundle, content_type="application/fhir+json")
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    ra = RiskAssessment.model_validate(r.json())
    assert ra.prediction[0].probabilityDecimal is not None
    record_id = r.headers["location"].rsplit("/", 1)[1]
    view = svc.get(f"/v1/risk/records/{record_id}").json()
    assert view["source"] == "fhir" and view["status"] == "scored"
    assert float(ra.prediction[0].probabilityDecimal) == pytest.approx(view["probability"])
    assert ra.subject.reference == "Patient/p1"
    # the same assessment later, on request
    again = svc.get(f"/v1/risk/records/{record_id}?format=fhir").json()
    assert RiskAssessment.model_validate(again).identifier[0].value == record_id
    # a child outside the intended population: stored, refused, an OperationOutcome (422)
    old = _post(
        svc,
        _bundle("2005-01-01", "2026-11-30T08:00:00+07:00"),
        content_type="application/fhir+json",
    )
    assert old.status_code == 422 and "location" in old.headers
    oo = OperationOutcome.model_validate(old.json())
    assert "outside_intended_population" in oo.model_dump_json()
    # JSON records answered as a FHIR Bundle when asked
    r = _post(svc, [CHILD], Accept="application/fhir+json")
    Bundle.model_validate(r.json())
    # a Bundle that cannot be read is a problem, stored nowhere
    n = len(svc.store.list_risk_records(None))
    bad = _post(svc, {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a"}},
        {"resource": {"resourceType": "Patient", "id": "b"}},
    ]}, content_type="application/fhir+json")  # fmt: skip
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_fhir"
    assert len(svc.store.list_risk_records(None)) == n


def _bundle(age_birthdate: str, when: str) -> dict[str, Any]:
    loinc = "http://loinc.org"

    def obs(i: int, code: str, value: float, unit: str) -> dict[str, Any]:
        return {
            "resource": {
                "resourceType": "Observation",
                "id": f"o{i}",
                "status": "final",
                "code": {"coding": [{"system": loinc, "code": code}]},
                "subject": {"reference": "Patient/p1"},
                "effectiveDateTime": when,
                "valueQuantity": {"value": value, "unit": unit},
            }
        }

    own = "https://diagnostics.example/fhir/CodeSystem/risk-feature"
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "id": "p1",
                    "identifier": [{"value": PATIENT}],
                    "gender": "female",
                    "birthDate": age_birthdate,
                }
            },
            obs(1, "6690-2", 3.1, "10*9/L"),
            obs(2, "777-3", 95, "10*9/L"),
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": "o3",
                    "status": "final",
                    "code": {"coding": [{"system": own, "code": "DayDisease"}]},
                    "subject": {"reference": "Patient/p1"},
                    "effectiveDateTime": when,
                    "valueQuantity": {"value": 2},
                }
            },
        ],
    }


def test_served_models_say_what_they_read(svc):
    (m,) = svc.get("/v1/risk/models").json()["models"]
    assert m["name"] == "dengue" and m["label"] == "dengue"
    assert {f["name"] for f in m["features"]} == {"Age", "WBC", "PLT", "DayDisease", "Vomiting"}
    assert m["population"] == {"Age": [1, 15], "DayDisease": [1, 3]}
