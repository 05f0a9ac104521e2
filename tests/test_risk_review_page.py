"""The risk worklist on the review page (no browser, then one click-through in Chromium):
records of the reviewer's clinics only, refusal codes in words in both languages, the outcome
form (CSRF, site isolation, refused records), agreement and calibration per site."""

from __future__ import annotations

import re
from html import unescape as html_text
from pathlib import Path

import httpx
import pytest
from conftest import REPO
from service_support import running_service, serve_config

PASSWORD = "mat-khau-rat-dai"


def _item(
    probability: float | None,
    *,
    status: str = "scored",
    code: str | None = None,
    reasons: tuple[str, ...] = (),
    imputed: tuple[str, ...] = (),
    profile_id: int | None = None,
    model: str = "dengue_vn",
    raw_probability: float | None = None,
    document: dict | None = None,
) -> dict:
    scored = status == "scored"
    if raw_probability is None and scored:
        raw_probability = probability * 0.9 if profile_id else probability
    return {
        "model": model,
        "label": "dengue",
        "source": "json",
        "status": status,
        "probability": probability if scored else None,
        "raw_probability": raw_probability if scored else None,
        "category": ("high" if probability >= 0.3 else "low") if scored else None,
        "threshold": 0.3,
        "imputed": list(imputed),
        "code": code,
        "reasons": list(reasons),
        "model_name": "dengue-vn-gbm",
        "model_sha256": "ab" * 32,
        "model_version": "3",
        "profile_id": profile_id,
        "idempotency_key": None,
        "document": document or {"source": "json", "record": {"Age": 7}},
    }


def _add(store, clinic: str, *items: dict) -> list[dict]:
    return [view for view, _ in store.add_risk_records(clinic, "key:test", list(items))]


@pytest.fixture(scope="module")
def svc(cxr_model, tmp_path_factory):
    cfg = serve_config(
        cxr_model,
        tmp_path_factory.mktemp("risk-web") / "serve",
        review={"secure_cookies": False, "default_language": "vi"},
    )
    with running_service(cfg) as s:
        s.store.create_reviewer("bs.a", PASSWORD, scope=["clinic-a"])
        s.store.create_reviewer("bs.b", PASSWORD, scope=["clinic-b"])
        s.store.create_reviewer("quan.tri", PASSWORD, role="admin")
        yield s


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def _login(svc, user: str) -> httpx.Client:
    c = httpx.Client(base_url=svc.url, follow_redirects=True, timeout=60)
    token = _csrf(c.get("/review/login").text)
    r = c.post("/review/login", data={"csrf": token, "username": user, "password": PASSWORD})
    assert r.status_code == 200
    return c


def _rows(html: str) -> list[str]:
    """Record IDs in the order the worklist shows them."""
    return re.findall(r'<tr id="risk-([0-9a-f]{32})"', html)


def test_the_worklist_shows_the_reviewers_clinic_in_both_languages(svc):
    low, high, done = _add(
        svc.store,
        "clinic-a",
        _item(0.12, imputed=("Platelet", "WBC")),
        _item(0.81, profile_id=4),
        _item(0.55),
    )
    (refused,) = _add(
        svc.store,
        "clinic-a",
        _item(
            None,
            status="refused",
            code="outside_intended_population",
            reasons=("Age 45 is outside [1, 15]",),
        ),
    )
    (other,) = _add(svc.store, "clinic-b", _item(0.9))
    svc.store.add_risk_outcome(done["id"], "user:bs.a", True, "NS1 dương tính")

    assert httpx.get(f"{svc.url}/review/risk", follow_redirects=False).status_code == 303
    a = _login(svc, "bs.a")
    html = a.get("/review/risk").text  # Vietnamese by default
    assert 'href="/review/risk"' in html and "Nguy cơ" in html  # the nav link
    shown = _rows(html)
    assert other["id"] not in shown and "clinic-b" not in html
    # awaiting an outcome first, high before low; then the rest, newest first
    assert shown[:2] == [high["id"], low["id"]]
    assert set(shown[2:]) == {done["id"], refused["id"]}
    assert "Ngoài quần thể dự định" in html and "Age 45 is outside [1, 15]" in html
    assert "Bị từ chối" in html and "Nguy cơ cao" in html and "Nguy cơ thấp" in html
    assert "Platelet, WBC" in html and "không có" in html  # imputed, or none
    assert "hiệu chỉnh theo cơ sở #4" in html
    assert "81.0%" in html and "30.0%" in html  # the probability and the threshold
    assert "Đã xác nhận" in html and "NS1 dương tính" in html and "(bs.a, " in html
    # the refused record has no outcome form; the scored ones do
    assert f"/review/risk/{refused['id']}/outcome" not in html
    assert f"/review/risk/{high['id']}/outcome" in html

    en = html_text(a.get("/review/lang/en", params={"next": "/review/risk"}).text)
    assert "Outside the model's intended population" in en
    assert "High risk" in en and "site calibration #4" in en and "none" in en
    assert "Confirmed" in en and "Risk worklist" in en

    # filters: refused only; awaiting only; a model nobody serves
    assert _rows(a.get("/review/risk", params={"status": "refused"}).text) == [refused["id"]]
    assert _rows(a.get("/review/risk", params={"awaiting": "1"}).text) == [high["id"], low["id"]]
    html = a.get("/review/risk", params={"model": "other"}).text
    assert _rows(html) == [] and 'id="no-risk-records"' in html
    html = a.get("/review/risk", params={"status": "<script>"}).text  # ignored, escaped
    assert "<script>" not in html and len(_rows(html)) == 4

    admin = _login(svc, "quan.tri")
    assert other["id"] in _rows(admin.get("/review/risk").text)
    actions = [r.action for r in svc.store.audit_rows("bs.a")]
    assert "risk.worklist.read" in actions


def test_recording_an_outcome_through_the_form(svc):
    (rec,) = _add(svc.store, "clinic-a", _item(0.64))
    (refused,) = _add(
        svc.store,
        "clinic-a",
        _item(None, status="refused", code="invalid_value", reasons=("Platelet: -3",)),
    )
    (other,) = _add(svc.store, "clinic-b", _item(0.7))
    a = _login(svc, "bs.a")
    token = _csrf(a.get("/review/risk").text)
    path = f"/review/risk/{rec['id']}/outcome"

    bad = a.post(path, data={"csrf": "forged", "outcome": "confirmed"})
    assert bad.status_code == 400 and svc.store.risk_view(rec["id"])["outcome"] is None
    assert a.post(path, data={"outcome": "confirmed"}).status_code == 400
    assert a.post(path, data={"csrf": token, "outcome": "maybe"}).status_code == 400

    r = a.post(
        path,
        data={"csrf": token, "outcome": "ruled_out", "note": "NS1 âm tính", "awaiting": "1"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert r.headers["location"].startswith("/review/risk?awaiting=1&saved=")
    outcome = svc.store.risk_view(rec["id"])["outcome"]
    assert outcome["value"] is False and outcome["by"] == "user:bs.a"
    assert outcome["note"] == "NS1 âm tính"
    audit = [x for x in svc.store.audit_rows(rec["id"]) if x.action == "risk.outcome"]
    assert len(audit) == 1 and audit[0].actor == "user:bs.a"
    html = a.get(f"/review/risk?saved={rec['id']}").text
    assert 'id="outcome-saved"' in html and "Đã loại trừ" in html
    html = a.get(f"/review/risk?awaiting=1&saved={rec['id']}").text
    assert rec["id"] not in _rows(html) and 'id="outcome-saved"' in html
    html = _login(svc, "bs.b").get(f"/review/risk?saved={rec['id']}").text
    assert 'id="outcome-saved"' not in html  # nothing said about another clinic's record

    # a record of another clinic, and one that does not exist: the same 404
    gone = a.post(f"/review/risk/{other['id']}/outcome", data={"csrf": token, "outcome": "unknown"})
    none = a.post(f"/review/risk/{'0' * 32}/outcome", data={"csrf": token, "outcome": "unknown"})
    assert gone.status_code == none.status_code == 404 and gone.text == none.text
    assert svc.store.risk_view(other["id"])["outcome"] is None
    # a refused record was never scored
    r = a.post(f"/review/risk/{refused['id']}/outcome", data={"csrf": token, "outcome": "unknown"})
    assert r.status_code == 409 and "bị từ chối" in r.text
    assert svc.store.risk_view(refused["id"])["outcome"] is None


def test_agreement_and_calibration_per_site(svc):
    a = _login(svc, "bs.a")
    before = a.get("/review/risk").text
    assert 'id="risk-agreement"' in before  # outcomes from the tests above, too few to calibrate
    assert "ít hơn 20 kết quả" in before or "mới có một loại kết quả" in before
    # 30 records of a second model at clinic-a with outcomes of both kinds, mostly agreeing
    probs = [0.05 + 0.03 * i for i in range(30)]
    recs = _add(svc.store, "clinic-a", *(_item(p, model="dengue_vn_cbc") for p in probs))
    for i, rec in enumerate(recs):
        positive = rec["probability"] >= 0.5 or i in (3, 7)
        svc.store.add_risk_outcome(rec["id"], "user:bs.a", positive)
    (b_rec,) = _add(svc.store, "clinic-b", _item(0.8, model="dengue_vn_cbc"))
    svc.store.add_risk_outcome(b_rec["id"], "user:bs.b", True)

    html = a.get("/review/risk").text
    table = html[html.index('id="risk-agreement"') :]
    row = re.search(
        r'<tr class="site" data-clinic="clinic-a" data-model="dengue_vn_cbc">(.*?)</tr>',
        table,
        re.S,
    )
    assert row, table
    cells = dict(re.findall(r'<td class="([a-z-]+)">([^<]*)</td>', row.group(1)))
    assert cells["n"] == "30"
    assert re.fullmatch(r"\d+\.\d%", cells["agreement"])
    assert re.fullmatch(r"0\.\d\d|1\.00", cells["auroc"]) and float(cells["auroc"]) > 0.8
    assert re.fullmatch(r"[+-]\d+\.\d\d", cells["intercept"])
    assert re.fullmatch(r"\d+\.\d\d", cells["slope"])
    assert cells["note"] == ""
    assert 'data-clinic="clinic-b"' not in table  # the other site's figures are not shown
    admin = _login(svc, "quan.tri").get("/review/risk").text
    assert 'data-clinic="clinic-b"' in admin[admin.index('id="risk-agreement"') :]


def test_every_risk_message_is_translated():
    from diagnostics.serve.i18n import MESSAGES, risk_code, risk_note
    from diagnostics.tables import REFUSAL_CODES

    assert set(MESSAGES["vi"]) == set(MESSAGES["en"])
    for code in REFUSAL_CODES:
        assert risk_code("vi", code) != risk_code("en", code) != code
    assert risk_code("vi", "new_code") == "new_code"
    note = "one outcome class only: no AUROC or calibration; fewer than 20 outcomes: no"
    assert "ít hơn 20 kết quả" in risk_note("vi", note + " calibration yet")


def _row(html: str, record_id: str) -> str:
    """One record's row of the worklist, as text (entities decoded)."""
    m = re.search(rf'<tr id="risk-{record_id}".*?</tr>', html, re.S)
    assert m, record_id
    return html_text(m.group(0))


def test_each_row_shows_the_values_sent_never_the_identifiers(svc, monkeypatch):
    from types import SimpleNamespace

    from diagnostics.train.risk_config import load_risk_config

    schema = load_risk_config(REPO / "configs/risk/dengue_vn_cbc.yaml").table_schema
    assert (schema.patient_column, schema.site_column) == ("StudyNo", "SiteNo")
    monkeypatch.setattr(
        svc.app.state, "risk_models", {"dengue_vn_cbc": SimpleNamespace(schema=schema)}
    )
    sent = {
        "StudyNo": "BN-2024-0777",
        "SiteNo": 3,
        "Age": 7,
        "DayDisease": 2,
        "WBC": 3.2,
        "PLT": 95.0,
    }
    fhir_notes = [
        "Observation (PLT) with status 'cancelled': ignored",
        "WBC: 2 Observations at different times: the latest used, 1 earlier value left out",
    ]
    json_rec, fhir_rec, gone, threshold_only = _add(
        svc.store,
        "clinic-c",
        _item(0.7, model="dengue_vn_cbc", document={"source": "json", "record": sent}),
        _item(
            0.2,
            model="dengue_vn_cbc",
            imputed=("PLT",),
            document={
                "source": "fhir",
                "record": {"Age": 8.0, "DayDisease": 2.0, "WBC": 3.2},
                "subject": {"reference": "Patient/p1", "identifier": {"value": "VN-079-2015-1"}},
                "notes": fhir_notes,
            },
        ),
        _item(
            0.4,
            model="retired",
            document={"source": "json", "record": {"StudyNo": "BN-X-9", "Age": 5}},
        ),
        _item(0.35, model="dengue_vn_cbc", profile_id=5, raw_probability=0.35),
    )
    admin = _login(svc, "quan.tri")
    html = admin.get("/review/risk", params={"clinic": "clinic-c"}).text
    assert "Giá trị đã gửi" in html
    # the identifiers never reach the page: neither the patient's nor the site's column
    for secret in ("BN-2024-0777", "StudyNo", "SiteNo", "BN-X-9", "VN-079-2015-1", "Patient/p1"):
        assert secret not in html, secret
    row = _row(html, json_rec["id"])
    # population columns first, then the features, as the schema orders them; 95.0 as 95
    assert re.search(
        r"Age = 7\s*DayDisease = 2\s*WBC = 3.2\s*PLT = 95\b", re.sub(r"<[^>]+>", "", row)
    )
    row = _row(html, fhir_rec["id"])
    text = re.sub(r"<[^>]+>", "", row)
    assert "Age = 8" in text and "WBC = 3.2" in text and "PLT =" not in text
    assert "Ghi chú khi đọc gói FHIR" in row and all(n in row for n in fhir_notes)
    assert '<td class="imputed">PLT</td>' in row  # imputed, and the note says why
    row = _row(html, gone["id"])
    assert "mô hình hiện không được triển khai tại đây" in row and "Age = " not in row
    row = _row(html, threshold_only["id"])
    assert "hiệu chỉnh theo cơ sở #5" in row and "chỉ dùng ngưỡng riêng của cơ sở" in row
    assert "mô hình trước hiệu chỉnh" not in row
    assert "chỉ dùng ngưỡng riêng" not in _row(html, json_rec["id"])

    en = admin.get("/review/lang/en", params={"next": "/review/risk?clinic=clinic-c"}).text
    assert "Values sent" in en and "model not served here: values not shown" in en
    assert "Notes on reading the FHIR Bundle" in en
    assert "the site&#39;s threshold only; risk not recalibrated" in en
    admin.get("/review/lang/vi", params={"next": "/review/risk"})

    # a document that cannot be read: said so, the page still renders
    monkeypatch.setattr(
        svc.store, "risk_document", lambda record_id: (_ for _ in ()).throw(OSError("gone"))
    )
    html = admin.get("/review/risk", params={"clinic": "clinic-c"}).text
    assert "không đọc được hồ sơ như đã gửi" in _row(html, json_rec["id"])


def test_agreement_rows_name_the_model_file_and_site_profile(svc, monkeypatch):
    import diagnostics.serve.web.risk as web_risk

    for rec in _add(svc.store, "clinic-c", _item(0.6), _item(0.6, model="dengue_vn_cbc")):
        svc.store.add_risk_outcome(rec["id"], "user:quan.tri", True)
    real = web_risk.site_agreement
    admin = _login(svc, "quan.tri")

    def table() -> str:
        html = admin.get("/review/risk").text
        return html_text(html[html.index('id="risk-agreement"') :])

    # as site_agreement is now: rows without the model file or the profile: nothing said
    monkeypatch.setattr(
        web_risk,
        "site_agreement",
        lambda pairs: [
            {k: v for k, v in r.items() if k not in ("model_sha256", "profile_id")}
            for r in real(pairs)
        ],
    )
    before = table()
    assert 'data-clinic="clinic-c"' in before
    assert 'class="model-file"' not in before and 'class="profile"' not in before

    # rows per model file and site profile
    def grouped(pairs):
        rows = real(pairs)
        return [
            {**r, "model_sha256": f"{i:x}" * 64, "profile_id": 9 if i % 2 == 0 else None}
            for i, r in enumerate(rows, start=10)
        ]

    monkeypatch.setattr(web_risk, "site_agreement", grouped)
    after = table()
    assert f">{'a' * 12}</code>" in after and f"sha256 {'a' * 64}" in after
    assert "a" * 13 + "<" not in after
    assert "cấu hình hiệu chỉnh của cơ sở #9" in after
    assert "hiệu chỉnh gốc của mô hình" in after
    en = admin.get("/review/lang/en", params={"next": "/review/risk"}).text
    en = html_text(en[en.index('id="risk-agreement"') :])
    assert "site profile #9" in en and "model's own calibration" in en
    admin.get("/review/lang/vi", params={"next": "/review/risk"})


# --------------------------------------------------------------------------- browser

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
def test_recording_an_outcome_by_clicking(svc):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing")
    sync_api = pytest.importorskip("playwright.sync_api")
    (rec,) = _add(svc.store, "clinic-a", _item(0.93))
    base = svc.url.replace("127.0.0.1", "localhost")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if "Security" in m.text else None)
            page.goto(f"{base}/review/login")
            page.fill("input[name=username]", "bs.a")
            page.fill("input[name=password]", PASSWORD)
            page.click("#login-button")
            page.wait_for_selector("#risk-nav")
            page.click("#risk-nav")
            page.wait_for_selector("#risk-records")
            row = page.locator(f"#risk-{rec['id']}")
            assert "Nguy cơ cao" in row.inner_text()
            page.check(f"#outcome-{rec['id']}-confirmed")
            row.locator("input[name=note]").fill("PCR dương tính")
            page.click(f"#outcome-submit-{rec['id']}")
            page.wait_for_selector("#outcome-saved")
            assert "Đã xác nhận" in page.locator(f"#risk-{rec['id']}").inner_text()
            out = REPO / "test-output"
            out.mkdir(exist_ok=True)
            page.screenshot(path=str(out / "risk_worklist_vi.png"), full_page=True)
            assert errors == []  # no CSP violation, no script error
        finally:
            browser.close()
    assert svc.store.risk_view(rec["id"])["outcome"]["value"] is True
