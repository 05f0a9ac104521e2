"""The review page over HTTP (no browser): sign-in, CSRF, escaping, site isolation, the
independent-impression option, the agreement page."""

from __future__ import annotations

import re

import httpx
import pytest
from service_support import dicom_bytes, running_service, serve_config, synth_pixels


@pytest.fixture(scope="module")
def svc(cxr_model, tmp_path_factory):
    cfg = serve_config(
        cxr_model,
        tmp_path_factory.mktemp("web") / "serve",
        review={"secure_cookies": False, "independent_impression_clinics": ["clinic-b"]},
        privacy={"store_filenames": True},  # a file name tests escaping below
    )
    with running_service(cfg) as s:
        s.store.create_reviewer("bs.a", "mat-khau-rat-dai", scope=["clinic-a"])
        s.store.create_reviewer("bs.b", "mat-khau-rat-dai", scope=["clinic-b"])
        s.store.create_reviewer("quan.tri", "mat-khau-rat-dai", role="admin")
        yield s


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def _login(svc, user: str, password: str = "mat-khau-rat-dai") -> httpx.Client:
    c = httpx.Client(base_url=svc.url, follow_redirects=True, timeout=60)
    token = _csrf(c.get("/review/login").text)
    r = c.post("/review/login", data={"csrf": token, "username": user, "password": password})
    assert r.status_code in (200, 401)
    return c


def test_sign_in_and_csrf(svc):
    c = httpx.Client(base_url=svc.url, follow_redirects=False)
    assert c.get("/review/").status_code == 303  # to the sign-in page
    bad = _login(svc, "bs.a", "wrong-password")
    assert "/review/login" in str(bad.get("/review/").url)
    c = _login(svc, "bs.a")
    assert c.get("/review/").status_code == 200
    r = c.post("/review/login", data={"csrf": "forged", "username": "bs.a", "password": "x"})
    assert r.status_code == 400
    r = c.post("/review/login", data={"csrf": "giả mạo", "username": "bs.a", "password": "x"})
    assert r.status_code == 400  # non-ASCII tokens are compared as bytes, not a 500
    actions = [a.action for a in svc.store.audit_rows("bs.a")]
    assert "user.login" in actions and "user.login_failed" in actions


def test_patient_text_is_escaped_and_sites_are_separate(svc):
    data = dicom_bytes(synth_pixels(1, seed=1600)[0], PatientName="<script>alert(1)</script>")
    sid = svc.upload(data, filename="<b onmouseover=alert(1)>x.dcm").json()["id"]
    svc.wait(sid)
    a = _login(svc, "bs.a")
    for path in ("/review/", f"/review/studies/{sid}"):
        html = a.get(path).text
        assert "<b onmouseover" not in html and "&lt;b onmouseover=alert(1)&gt;x.dcm" in html
        assert "<script>alert" not in html
    b = _login(svc, "bs.b")
    assert b.get(f"/review/studies/{sid}").status_code == 404
    assert b.get(f"/review/studies/{sid}/image.png").status_code == 404
    assert b.get("/review/agreement").status_code == 403
    admin = _login(svc, "quan.tri")
    assert admin.get(f"/review/studies/{sid}").status_code == 200
    assert admin.get("/review/agreement").status_code == 200


def test_independent_impression_comes_first_where_the_site_asks(svc):
    sid = svc.upload(dicom_bytes(synth_pixels(1, seed=1700)[0]), key=svc.other_clinic).json()["id"]
    svc.wait_stored(sid)
    b = _login(svc, "bs.b")
    html = b.get(f"/review/studies/{sid}").text
    assert 'id="impression-submit"' in html and 'id="review-form"' not in html  # AI hidden
    r = b.post(f"/review/studies/{sid}/review", data={"csrf": _csrf(html)})
    assert r.status_code == 400  # no review before the impression
    doc = svc.store.study_view(sid)
    for f in doc["findings"]:  # nor any AI output: heatmaps, worklist flags
        assert b.get(f"/review/studies/{sid}/heatmaps/{f['label']}.png").status_code == 404
    assert (
        "AI positive" not in b.get("/review/").text
        and "AI dương tính" not in b.get("/review/").text
    )
    b.post(
        f"/review/studies/{sid}/impression",
        data={"csrf": _csrf(html), "impression": "tràn dịch nhẹ bên phải"},
    )
    html = b.get(f"/review/studies/{sid}").text
    assert 'id="review-form"' in html
    views = [a for a in svc.store.audit_rows(sid) if a.action == "study.view"]
    # the first view hid the AI; after the impression (redirect, then reload) it is shown
    assert [v.detail["ai_shown"] for v in views] == [False, True, True]
    assert all(v.detail["independent_impression"] for v in views)


def test_worklist_filters_and_pages(svc):
    for px in synth_pixels(3, seed=1800):
        svc.wait(svc.upload(dicom_bytes(px)).json()["id"])
    a = _login(svc, "bs.a")
    html = a.get("/review/", params={"status": "failed_qc"}).text
    assert 'table class="worklist"' not in html  # none refused at clinic-a
    html = a.get("/review/", params={"sort": "newest", "clinic": "clinic-a"}).text
    assert html.count('class="open"') >= 3
    vi = a.get("/review/lang/vi", params={"next": "/review/"}).text
    assert "Danh sách cần đọc" in vi
    assert a.get("/review/lang/en", params={"next": "https://evil.example/"}).url.path == "/review/"


def test_every_message_is_translated():
    from diagnostics.serve.i18n import FINDING_NAMES, MESSAGES

    assert set(MESSAGES["vi"]) == set(MESSAGES["en"])
    assert set(FINDING_NAMES["vi"]) == set(FINDING_NAMES["en"])
    from diagnostics.contract import FINDINGS as VOCABULARY

    assert set(VOCABULARY) <= set(FINDING_NAMES["en"])  # every harmonised finding has a name


def test_users_command(home):
    from typer.testing import CliRunner

    from diagnostics.cli import app

    runner = CliRunner()
    r = runner.invoke(
        app,
        ["users", "create", "bs.mai", "--clinic", "tyt-1", "--password-stdin"],
        input="mat-khau-rat-dai\n",
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        ["users", "create", "bs.ngan", "--clinic", "tyt-1", "--password-stdin"],
        input="short\n",
    )
    assert r.exit_code == 2 and "10 characters" in r.output
    # the database and its write-ahead log, where recent commits live until a checkpoint
    db = b"".join(f.read_bytes() for f in (home / "serve").glob("service.db*"))
    assert b"mat-khau-rat-dai" not in db and b"$argon2" in db
