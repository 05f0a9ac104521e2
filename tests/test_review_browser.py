"""The review page in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; no browser download). Screenshots go to test-output/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import REPO
from service_support import dicom_bytes, running_service, serve_config, synth_pixels

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; `make test` tries)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_review_in_the_browser(browser, cxr_model, tmp_path):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    out = REPO / "test-output"
    out.mkdir(exist_ok=True)
    # Secure cookies on, as in production: Chromium sends them to http://localhost.
    cfg = serve_config(
        cxr_model,
        tmp_path / "serve",
        review={"default_language": "en"},
        privacy={"store_filenames": True},  # the file name below tests escaping
    )
    with running_service(cfg) as svc:
        svc.store.create_reviewer("bs.lan", "mat-khau-rat-dai", scope=["clinic-a"])
        sids = []
        for i, px in enumerate(synth_pixels(6, seed=1400)):
            name = "<img src=x onerror=alert(1)>.dcm" if i == 0 else f"s{i}.dcm"
            data = dicom_bytes(px, PatientName="<script>alert('p')</script>")
            sids.append(svc.upload(data, filename=name).json()["id"])
        views = [svc.wait(s) for s in sids]
        with_heat = next(v for v in views if any(f["heatmap"] for f in v["findings"]))
        base = svc.url.replace("127.0.0.1", "localhost")
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

        # 1. sign in
        page.goto(f"{base}/review/")
        assert "/review/login" in page.url
        page.fill("input[name=username]", "bs.lan")
        page.fill("input[name=password]", "mat-khau-rat-dai")
        page.click("#login-button")
        # 2. the worklist: flagged studies first
        page.wait_for_selector("table.worklist")
        assert page.locator("h1").inner_text() == "Worklist"
        assert page.locator("tr.flagged").count() >= 1
        page.screenshot(path=str(out / "worklist.png"), full_page=True)
        # 3. a study with a heatmap; the overlay switches off and on, opacity changes
        page.click(f"a[href='/review/studies/{with_heat['id']}']")
        page.wait_for_selector("#review-form")
        heat = page.locator("img.heat").first
        assert heat.is_visible()
        page.locator(".heat-toggle").first.uncheck()
        assert not heat.is_visible()
        page.locator(".heat-toggle").first.check()
        page.fill("#heat-opacity", "30")
        page.dispatch_event("#heat-opacity", "input")
        assert abs(float(heat.evaluate("e => getComputedStyle(e).opacity")) - 0.3) < 0.01
        # 4. Vietnamese
        page.click("#lang-switch")
        page.wait_for_selector("#review-form")
        assert "Gửi đánh giá" in page.locator("#review-submit").inner_text()
        assert "Đồng ý" in page.content()
        page.screenshot(path=str(out / "study_vi.png"), full_page=True)
        # 5. a review of every finding, one corrected
        for f in with_heat["findings"]:
            page.check(f"input[name=verdict_{f['id']}][value=agree]")
        first = with_heat["findings"][0]
        page.check(f"input[name=verdict_{first['id']}][value=disagree]")
        page.select_option(f"select[name=corrected_{first['id']}]", "No_Finding")
        page.click("#review-submit")
        page.wait_for_selector("#saved")
        assert "Đã lưu đánh giá" in page.locator("#saved").inner_text()
        page.screenshot(path=str(out / "study_reviewed_vi.png"), full_page=True)
        # escaped everywhere: no script ever ran
        page.goto(f"{base}/review/")
        assert dialogs == []
        assert "<img src=x onerror=alert(1)>.dcm" in page.locator("table.worklist").inner_text()
        assert page.locator("table.worklist img").count() == 0  # shown as text, not markup
        page.close()

        # 6. the audit table and the FHIR report
        actions = [(a.actor, a.action) for a in svc.store.audit_rows(with_heat["id"])]
        assert ("user:bs.lan", "study.view") in actions
        assert ("user:bs.lan", "review.create") in actions
        view_rows = [a for a in svc.store.audit_rows(with_heat["id"]) if a.action == "study.view"]
        assert view_rows[0].detail["model_sha256"] == with_heat["findings"][0]["model_sha256"]
        report = svc.get(f"/v1/studies/{with_heat['id']}/report").json()
        assert DiagnosticReport.model_validate(report).status == "final"
    assert (out / "worklist.png").stat().st_size > 0
    shutil.copy(out / "study_vi.png", tmp_path / "study_vi.png")  # keep one beside the test too


def test_reviewer_cannot_open_another_sites_study(browser, cxr_model, tmp_path):
    cfg = serve_config(cxr_model, tmp_path / "serve")
    with running_service(cfg) as svc:
        svc.store.create_reviewer("bs.b", "mat-khau-rat-dai", scope=["clinic-b"])
        sid = svc.upload(dicom_bytes(synth_pixels(1, seed=1500)[0])).json()["id"]
        page = browser.new_page()
        base = svc.url.replace("127.0.0.1", "localhost")
        page.goto(f"{base}/review/login")
        page.fill("input[name=username]", "bs.b")
        page.fill("input[name=password]", "mat-khau-rat-dai")
        page.click("#login-button")
        page.wait_for_selector("h1")
        response = page.goto(f"{base}/review/studies/{sid}")
        assert response.status == 404
        page.close()


def test_a_patient_outside_the_population_in_the_browser(browser, population_model, tmp_path):
    """A site that flags instead of refusing: the 45-year-old's study has no call, says why,
    and the worklist does not triage it; a child of 3 is scored as usual."""
    out = REPO / "test-output"
    out.mkdir(exist_ok=True)
    cfg = serve_config(
        population_model,
        tmp_path / "serve",
        qc={"ood": False, "population": "flag"},
        review={"default_language": "vi"},
    )
    with running_service(cfg) as svc:
        svc.store.create_reviewer("bs.nhi", "mat-khau-rat-dai", scope=["clinic-a"])
        px = synth_pixels(2, seed=1700)
        adult = svc.wait(svc.upload(dicom_bytes(px[0], PatientAge="045Y")).json()["id"])
        child = svc.wait(svc.upload(dicom_bytes(px[1], PatientAge="003Y")).json()["id"])
        assert adult["flag"] == "outside_intended_population" and child["flag"] is None
        base = svc.url.replace("127.0.0.1", "localhost")
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base}/review/login")
        page.fill("input[name=username]", "bs.nhi")
        page.fill("input[name=password]", "mat-khau-rat-dai")
        page.click("#login-button")
        page.wait_for_selector("table.worklist")
        assert page.locator(".no-call-flag").count() == 1
        page.click(f"a[href='/review/studies/{adult['id']}']")
        page.wait_for_selector("#no-call")
        banner = page.locator("#no-call").inner_text()
        assert "Tuổi của bệnh nhân (45 tuổi)" in banner and "từ 1 đến 5 tuổi" in banner
        assert page.locator("fieldset.no-call").count() == len(adult["findings"])
        assert "từ 1 đến 5 tuổi" in page.locator("#population").inner_text()
        page.screenshot(path=str(out / "study_outside_population_vi.png"), full_page=True)
        page.goto(f"{base}/review/studies/{child['id']}")
        page.wait_for_selector("#review-form")
        assert page.locator("#no-call").count() == 0
        page.close()
