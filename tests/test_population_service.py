"""The intended population at the clinic service: refused or flagged uploads, what the API, the
review page and the FHIR report say about them, and monitoring per site and day. A real
uvicorn server, SQLite, and the exported `population_model`."""

from __future__ import annotations

import re

import httpx
import pytest
from service_support import dicom_bytes, running_service, serve_config, synth_pixels

from diagnostics.serve.qc import OUTSIDE_POPULATION


@pytest.fixture(scope="module")
def flagging(population_model, tmp_path_factory):
    cfg = serve_config(
        population_model,
        tmp_path_factory.mktemp("pop_flag") / "serve",
        qc={"ood": False, "population": "flag"},
        review={"secure_cookies": False},
        monitor={"alert_share": 0.5, "min_studies": 3},
    )
    with running_service(cfg) as s:
        s.store.create_reviewer("bs.nhi", "mat-khau-rat-dai", scope=["clinic-a"])
        s.store.create_reviewer("quan.tri", "mat-khau-rat-dai", role="admin")
        yield s


def _login(svc, user: str) -> httpx.Client:
    c = httpx.Client(base_url=svc.url, follow_redirects=True, timeout=60)
    token = re.search(r'name="csrf" value="([^"]+)"', c.get("/review/login").text).group(1)
    c.post("/review/login", data={"csrf": token, "username": user, "password": "mat-khau-rat-dai"})
    return c


def test_refused_by_age_at_a_refusing_site(population_model, tmp_path):
    cfg = serve_config(population_model, tmp_path / "serve", qc={"ood": False})
    with running_service(cfg) as svc:
        adult = svc.upload(dicom_bytes(synth_pixels(1, seed=900)[0], PatientAge="045Y"))
        child = svc.upload(dicom_bytes(synth_pixels(1, seed=901)[0], PatientAge="003Y"))
        refused, scored = svc.wait(adult.json()["id"]), svc.wait(child.json()["id"])
    assert refused["status"] == "failed_qc" and refused["error_code"] == OUTSIDE_POPULATION
    assert not refused["findings"] and "45 years" in refused["result"]["message"]
    assert scored["status"] == "scored" and scored["flag"] is None
    assert all(f["positive"] is not None for f in scored["findings"])


def test_flagged_study_has_no_call_no_triage_and_says_why(flagging):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.observation import Observation

    svc = flagging
    adult = svc.wait(
        svc.upload(dicom_bytes(synth_pixels(1, seed=902)[0], PatientAge="045Y")).json()["id"]
    )
    assert adult["status"] == "scored" and adult["flag"] == OUTSIDE_POPULATION
    assert all(f["positive"] is None and f["heatmap"] is None for f in adult["findings"])
    assert adult["result"]["flags"] == [OUTSIDE_POPULATION]
    assert "scored with a flag" in adult["result"]["message"]

    # The API's worklist: a flagged study is never triaged as AI-positive.
    items = svc.get("/v1/worklist", svc.reviewer).json()["studies"]
    row = next(i for i in items if i["id"] == adult["id"])
    assert row["any_positive"] is False and row["flag"] == OUTSIDE_POPULATION

    # FHIR: no interpretation on any finding, and a note that says why, in both languages.
    for lang, words in (("en", "No AI call"), ("vi", "AI không kết luận")):
        doc = svc.get(f"/v1/studies/{adult['id']}/report?lang={lang}", svc.reviewer).json()
        DiagnosticReport.model_validate(doc)
        observations = [r for r in doc["contained"] if r["resourceType"] == "Observation"]
        for obs in observations:
            Observation.model_validate(obs)
            assert "interpretation" not in obs
            assert words in obs["note"][0]["text"] and "45" in obs["note"][0]["text"]
        assert words in doc["conclusion"]
    text = svc.get(f"/v1/studies/{adult['id']}/report?format=text", svc.reviewer).text
    assert "no AI call" in text and "outside the ages the model was made for" in text


def test_review_page_shows_the_population_and_the_missing_call(flagging):
    svc = flagging
    sid = svc.upload(dicom_bytes(synth_pixels(1, seed=903)[0], PatientAge="045Y")).json()["id"]
    svc.wait(sid)
    c = _login(svc, "bs.nhi")
    html = c.get(f"/review/studies/{sid}").text  # Vietnamese by default
    assert 'id="no-call"' in html and "Tuổi của bệnh nhân (45 tuổi)" in html
    assert "không kết luận" in html and 'id="population"' in html
    assert "từ 1 đến 5 tuổi" in html
    c.get("/review/lang/en?next=/review/")
    html = c.get(f"/review/studies/{sid}").text
    assert "The AI makes no positive or negative call" in html and "ages 1 to 5 years" in html
    worklist = c.get("/review/").text
    assert (
        "Outside the model&#39;s population" in worklist
        or "Outside the model's population" in worklist
    )


def test_monitoring_per_site_and_day_with_an_alert(flagging, caplog):
    svc = flagging
    caplog.set_level("WARNING", logger="diagnostics.serve.monitor")
    for seed in (904, 905, 906):
        sid = svc.upload(dicom_bytes(synth_pixels(1, seed=seed)[0], PatientAge="060Y")).json()["id"]
        svc.wait(sid)
    doc = svc.get("/v1/stats/population", svc.reviewer).json()
    today = doc["days"][0]
    assert today["clinic"] == "clinic-a" and today["flagged_population"] >= 3
    assert today["outside_share"] >= 0.5 and today["alert"] is True
    assert doc["alert_share"] == 0.5
    metrics = svc.get("/metrics", svc.admin).text
    assert re.search(
        r'diagnostics_outside_population_share\{clinic="clinic-a",day="[0-9-]+"\} ', metrics
    )
    assert re.search(
        r'diagnostics_population_alert\{clinic="clinic-a",day="[0-9-]+"\} 1\.0', metrics
    )
    assert 'outcome="flagged_population"' in metrics
    admin = _login(svc, "quan.tri")
    page = admin.get("/review/agreement").text
    assert 'id="monitor"' in page and "clinic-a" in page and 'class="alert"' in page
    # logged once, by the worker, when its queue emptied
    alerts = [r for r in caplog.records if "site clinic-a:" in r.getMessage()]
    assert len(alerts) == 1 and "alert level 50%" in alerts[0].getMessage()


def test_a_site_recalibrates_the_population_check(population_model, tmp_path):
    """`models recalibrate --population` on a site's own in-population images: the site's
    threshold lands in its profile, and the service uses it for that site only."""
    import yaml
    from service_support import png_bytes
    from typer.testing import CliRunner

    from diagnostics.cli import app
    from diagnostics.data.synthetic import write_dataset

    site_images = write_dataset(tmp_path / "site", 110, size=64, seed=910)
    site_cfg = tmp_path / "site.yaml"
    site_cfg.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source": "manifest",
                    "labels_file": str(site_images),
                    "split": {"fractions": {"all": 1.0}},
                }
            }
        )
    )
    cfg = serve_config(population_model, tmp_path / "serve", qc={"ood": False})
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    args = [
        "models",
        "recalibrate",
        str(population_model),
        "-c",
        str(site_cfg),
        "--site",
        "clinic-a",
        "--serve-config",
        str(serve_yaml),
        "--population",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "population check: n=110" in r.output and "site profile" in r.output
    with running_service(cfg) as svc:
        sha = svc.app.state.holder.model.sha256
        profile = svc.store.site_profile(sha, "clinic-a")
        assert profile.population_threshold is not None
        assert profile.evidence["population"]["n"] == 110
        # make the site's limit impossible to meet, to see that it is the one applied
        svc.store.save_profile(
            model_sha256=sha,
            site="clinic-a",
            temperatures={},
            thresholds={},
            policy="test",
            evidence={},
            population_threshold=1e9,
            created_by="test",
        )
        (px,) = synth_pixels(1, seed=911)
        a = svc.wait(
            svc.upload(png_bytes(px), filename="a.png", content_type="image/png").json()["id"]
        )
        b = svc.wait_stored(
            svc.upload(
                png_bytes(px), key=svc.other_clinic, filename="b.png", content_type="image/png"
            ).json()["id"]
        )
    assert a["status"] == "failed_qc" and a["result"]["population"]["check_limit"] == 1e9
    assert b["status"] == "scored"  # clinic-b: the model's own threshold
