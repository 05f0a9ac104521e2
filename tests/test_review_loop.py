"""Reviews through the API -> FHIR reports -> agreement statistics -> manifest -> training."""

from __future__ import annotations

import httpx
import pandas as pd
import pytest
from conftest import tiny_cxr_config
from service_support import dicom_bytes, png_bytes, running_service, serve_config, synth_pixels


@pytest.fixture(scope="module")
def svc(cxr_model, tmp_path_factory):
    cfg = serve_config(cxr_model, tmp_path_factory.mktemp("loop") / "serve")
    with running_service(cfg) as s:
        yield s


def _review(svc, sid: str, items: list[dict]) -> httpx.Response:
    return httpx.post(
        f"{svc.url}/v1/studies/{sid}/reviews",
        json={"reviews": items},
        headers=svc.headers(svc.reviewer),
    )


def test_fhir_report_preliminary_then_final(svc):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    (px,) = synth_pixels(1, seed=1000)
    sid = svc.upload(dicom_bytes(px, PatientName="<script>alert(1)</script>")).json()["id"]
    doc = svc.wait(sid)
    r = svc.get(f"/v1/studies/{sid}/report")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    report = DiagnosticReport.model_validate(r.json())  # a valid FHIR R4(B) resource
    assert report.status == "preliminary"
    observations = [c for c in r.json()["contained"] if c["resourceType"] == "Observation"]
    for o in observations:
        Observation.model_validate(o)
    assert len(observations) == len(doc["findings"])
    device = next(c for c in r.json()["contained"] if c["resourceType"] == "Device")
    assert device["identifier"][0]["value"] == f"sha256:{doc['findings'][0]['model_sha256']}"
    assert "script" not in r.text  # no patient data in the report at all
    items = [{"finding_id": f["id"], "verdict": "agree"} for f in doc["findings"]]
    assert _review(svc, sid, items).status_code == 201
    final = svc.get(f"/v1/studies/{sid}/report?lang=vi").json()
    assert DiagnosticReport.model_validate(final).status == "final"
    assert final["code"]["text"].startswith("Kết quả AI")
    text = svc.get(f"/v1/studies/{sid}/report?format=text&lang=vi").text
    assert "bác sĩ: đồng ý" in text
    # a finding the clinician adds appears in the report; a listed one cannot be "added"
    assert _review(svc, sid, [{"unlisted": True, "corrected_label": "Mass"}]).status_code == 201
    listed = doc["findings"][0]["label"]
    r = _review(svc, sid, [{"unlisted": True, "corrected_label": listed}])
    assert r.status_code == 422 and r.json()["code"] == "finding_listed"
    final = svc.get(f"/v1/studies/{sid}/report").json()
    DiagnosticReport.model_validate(final)
    added = [c for c in final["contained"] if c["id"].startswith("added-")]
    assert [a["code"]["coding"][0]["code"] for a in added] == ["Mass"]
    # another clinic's reviewer or key cannot read it
    assert svc.get(f"/v1/studies/{sid}/report", key=svc.other_clinic).status_code == 404


def test_clinic_key_cannot_use_reviewer_endpoints(svc):
    assert svc.get("/v1/stats/agreement").status_code == 403
    assert svc.get("/v1/worklist").status_code == 403


def test_export_closes_the_loop_into_training(svc, tmp_path, home):
    from diagnostics.serve.feedback import export_manifest
    from diagnostics.train.cxr import train_cxr

    sids = []
    for i, px in enumerate(synth_pixels(12, seed=1100)):
        data = dicom_bytes(px, PatientID=f"HIS-{i % 4}") if i % 2 else png_bytes(px)
        kw = {} if i % 2 else {"filename": "x.png", "content_type": "image/png"}
        sids.append(svc.upload(data, **kw).json()["id"])
    for k, sid in enumerate(sids):
        doc = svc.wait(sid)
        verdicts = ["agree", "disagree", "uncertain"]
        items = [
            {"finding_id": f["id"], "verdict": verdicts[(k + j) % 3]}
            for j, f in enumerate(doc["findings"])
        ]
        if k == 0:
            items.append({"unlisted": True, "corrected_label": "Atelectasis"})
        assert _review(svc, sid, items).status_code == 201
    # an unreviewed study stays on the worklist, even with "not listed" reviews elsewhere
    waiting = svc.upload(dicom_bytes(synth_pixels(1, seed=1250)[0])).json()["id"]
    svc.wait(waiting)
    listed = {s["id"] for s in svc.get("/v1/worklist", key=svc.reviewer).json()["studies"]}
    assert waiting in listed and sids[0] not in listed
    refused = svc.upload(
        png_bytes(synth_pixels(1, seed=1200)[0] * 0 + 0.5),
        filename="f.png",
        content_type="image/png",
    ).json()["id"]
    assert svc.wait(refused)["status"] == "failed_qc"

    stats = svc.get("/v1/stats/agreement", key=svc.reviewer).json()["agreement"]
    assert stats and all(0 <= s["share_agreed"] <= 1 for s in stats)
    assert sum(s["reviewed"] for s in stats) >= 12 * len(svc.app.state.holder.model.labels)

    out = tmp_path / "manifest.csv"
    n = export_manifest(svc.store, out, svc.data_dir)
    table = pd.read_csv(out)
    assert n == len(table) and refused not in set(table["study_id"])
    assert set(sids) <= set(table["study_id"])
    first = table[table["study_id"] == sids[0]].iloc[0]
    assert first["Atelectasis"] == 1
    # uncertain -> NaN; the same DICOM PatientID -> the same key, never the ID itself
    assert table[svc.app.state.holder.model.labels].isna().any().any()
    dicom_keys = table[table["study_id"].isin(sids[1::2])]["patient_key"]
    assert dicom_keys.nunique() == 2 and not dicom_keys.str.contains("HIS").any()  # HIS-1, HIS-3
    # a manifest `train cxr` accepts: one batch
    cfg = tiny_cxr_config(
        out,
        name="feedback",
        size=32,
        train={"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 1},
    )
    result = train_cxr(cfg, progress=False, log_to_mlflow=False)
    assert result.onnx_path.is_file()


def test_report_and_export_commands(svc, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from diagnostics.cli import app

    config = tmp_path / "serve.yaml"
    cfg = {"data_dir": str(svc.data_dir)}
    config.write_text(yaml.safe_dump(cfg))
    (px,) = synth_pixels(1, seed=1300)
    sid = svc.upload(dicom_bytes(px)).json()["id"]
    svc.wait(sid)
    runner = CliRunner()
    r = runner.invoke(app, ["report", sid, "--format", "text", "--lang", "en", "-c", str(config)])
    assert r.exit_code == 0 and "preliminary" in r.stdout, r.output
    r = runner.invoke(app, ["report", sid, "--format", "fhir", "-c", str(config)])
    assert r.exit_code == 0 and '"resourceType": "DiagnosticReport"' in r.stdout
    out = tmp_path / "m.csv"
    r = runner.invoke(
        app, ["reviews", "export", "--out", str(out), "--clinic", "clinic-a", "-c", str(config)]
    )
    assert r.exit_code == 0 and out.is_file(), r.output
