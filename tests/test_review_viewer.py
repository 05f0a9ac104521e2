"""The review page's image viewer: every image of a study (a PA and a lateral), its pixels at
full bit depth for window/level, per-image heat layers; over HTTP and in a real Chromium."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO
from service_support import dicom_bytes, running_service, serve_config, synth_pixels

ROWS, COLS = 1280, 1040  # the PA: portrait, over the viewer's 1024 px


def _big(pixels: np.ndarray) -> np.ndarray:
    """A synthetic chest enlarged to ROWS x COLS, so the viewer must downsample it."""
    from PIL import Image

    img = Image.fromarray(pixels.astype(np.float32), mode="F")
    return np.clip(np.asarray(img.resize((COLS, ROWS), Image.Resampling.BILINEAR)), 0, 1)


def _login(svc, user: str) -> httpx.Client:
    c = httpx.Client(base_url=svc.url, follow_redirects=True, timeout=60)
    html = c.get("/review/login").text
    token = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
    c.post("/review/login", data={"csrf": token, "username": user, "password": "mat-khau-rat-dai"})
    return c


def _two_image_study(svc, seed: int) -> dict:
    """A PA (kept open), then a lateral of the same Study Instance UID that completes it."""
    from pydicom.uid import generate_uid

    uid = generate_uid()
    pa, lat = synth_pixels(2, seed=seed)
    auth = svc.headers(svc.submitter)
    r = httpx.post(
        f"{svc.url}/v1/studies",
        params={"complete": "false"},
        files={
            "file": ("pa.dcm", dicom_bytes(_big(pa), StudyInstanceUID=uid), "application/dicom")
        },
        headers=auth,
        timeout=60,
    )
    assert r.status_code == 202, r.text
    sid = r.json()["id"]
    lateral = dicom_bytes(lat, StudyInstanceUID=uid, ViewPosition="LL")
    r = httpx.post(
        f"{svc.url}/v1/studies/{sid}/instances",
        params={"complete": "true"},
        files={"file": ("ll.dcm", lateral, "application/dicom")},
        headers=auth,
        timeout=60,
    )
    assert r.status_code == 202, r.text
    svc.wait(sid)
    return svc.store.study_view(sid)


@pytest.fixture(scope="module")
def svc(cxr_model, tmp_path_factory):
    cfg = serve_config(
        cxr_model,
        tmp_path_factory.mktemp("viewer") / "serve",
        review={"secure_cookies": False, "default_language": "en"},
        qc={"ood": False},  # the enlarged, padded PA is unlike the fixture's training images
    )
    with running_service(cfg) as s:
        s.store.create_reviewer("bs.a", "mat-khau-rat-dai", scope=["clinic-a"])
        s.store.create_reviewer("bs.b", "mat-khau-rat-dai", scope=["clinic-b"])
        s.study = _two_image_study(s, seed=2100)
        yield s


def _pa_ll(study: dict) -> tuple[dict, dict]:
    pa, ll = study["images"]
    assert (pa["view"], pa["status"]) == ("PA", "scored")
    assert (ll["view"], ll["status"], ll["code"]) == ("LL", "failed_qc", "view_not_frontal")
    return pa, ll


def test_the_page_lists_every_image_with_its_status(svc):
    pa, ll = _pa_ll(svc.study)
    sid = svc.study["id"]
    a = _login(svc, "bs.a")
    html = a.get(f"/review/studies/{sid}").text
    assert f'id="thumb-{pa["id"]}"' in html and f'id="thumb-{ll["id"]}"' in html
    assert "Lateral view: not scored" in html
    assert f"{sid}/images/{pa['id']}/image.png" in html  # the scored PA is shown first
    assert re.search(r"Per image: PA \d+% · LL —", html)  # each image's probability
    chosen = a.get(f"/review/studies/{sid}", params={"image": ll["id"]}).text  # without JS
    assert f'src="/review/studies/{sid}/images/{ll["id"]}/image.png"' in chosen
    a.get("/review/lang/vi", params={"next": "/review/"})
    assert "Phim nghiêng: AI không chấm" in a.get(f"/review/studies/{sid}").text
    assert a.get(f"/review/studies/{sid}/images/{ll['id']}/image.png").status_code == 200
    # the study's heat layers are the PA's; none on the lateral, none in another study
    for f in svc.study["findings"]:
        part = next(p for p in f["images"] if p["instance_id"] == pa["id"])
        url = f"/review/studies/{sid}/images/{{}}/heatmaps/{f['label']}.png"
        expected = 200 if f["positive"] and part["heatmap"] else 404
        assert a.get(url.format(pa["id"])).status_code == expected
        assert a.get(url.format(ll["id"])).status_code == 404


def test_pixels_at_full_depth_and_only_for_the_study(svc):
    from diagnostics.serve.reports import stored_preprocessing
    from diagnostics.serve.web.study import model_box

    pa, ll = _pa_ll(svc.study)
    sid = svc.study["id"]
    a = _login(svc, "bs.a")
    r = a.get(f"/review/studies/{sid}/images/{pa['id']}/pixels")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.headers["cache-control"].startswith("private")
    rows, cols = int(r.headers["x-rows"]), int(r.headers["x-columns"])
    assert (rows, cols) == (1024, round(COLS * 1024 / ROWS))  # long side down to 1024
    assert len(r.content) == rows * cols * 2
    values = np.frombuffer(r.content, "<u2")
    assert len(np.unique(values)) > 256  # more than 8 bits of grey (12-bit DICOM)
    spec = stored_preprocessing(
        svc.store.get_instance(pa["id"]).result, svc.app.state.holder.model
    )[0]
    box = [float(v) for v in r.headers["x-model-box"].split(",")]
    assert box == pytest.approx(model_box(ROWS, COLS, spec.crop), abs=1e-6)
    r = a.get(f"/review/studies/{sid}/images/{ll['id']}/pixels")  # small: as it is
    assert len(r.content) == int(r.headers["x-rows"]) * int(r.headers["x-columns"]) * 2
    # another clinic's reviewer, and an image of another study: 404
    b = _login(svc, "bs.b")
    assert b.get(f"/review/studies/{sid}/images/{pa['id']}/pixels").status_code == 404
    other = svc.wait(svc.upload(dicom_bytes(synth_pixels(1, seed=2200)[0])).json()["id"])
    other_image = svc.store.study_view(other["id"])["images"][0]["id"]
    for tail in ("pixels", "image.png"):
        assert a.get(f"/review/studies/{sid}/images/{other_image}/{tail}").status_code == 404
    assert a.get(f"/review/studies/{other['id']}/images/{other_image}/pixels").status_code == 200


@pytest.mark.parametrize("crop", ["center", "letterbox", "squash"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (30, 30)])
def test_model_box_matches_the_models_square(crop, shape):
    from diagnostics.imaging import square
    from diagnostics.serve.web.study import model_box

    rows, cols = shape
    ys, xs = np.mgrid[0:rows, 0:cols]
    sq = square((ys * 1000 + xs + 1).astype(np.float64), crop)  # each pixel knows its place
    x, y, w, h = model_box(rows, cols, crop)
    if crop == "squash":
        assert (x, y, w, h) == (0, 0, 1, 1)
        return
    top, left, side = round(y * rows), round(x * cols), sq.shape[0]
    assert round(w * cols) == round(h * rows) == side
    i, j = np.mgrid[0:side, 0:side]
    r, c = top + i, left + j  # where each square pixel lies on the image
    on = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
    assert (sq[on] == (r * 1000 + c + 1)[on]).all() and (sq[~on] == 0).all()


@pytest.mark.browser
def test_the_viewer_in_the_browser(svc):
    from test_review_browser import ARGS, CHROMIUM

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; `make test` tries)")
    sync_api = pytest.importorskip("playwright.sync_api")
    pa, ll = _pa_ll(svc.study)
    base = svc.url.replace("127.0.0.1", "localhost")
    sample = """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = 0, n = 0; for (let i = 0; i < d.length; i += 4) { s += d[i]; n += d[i] > 8; }
        return [s, n, c.width, c.height]; }"""
    out = REPO / "test-output"
    out.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1200})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base}/review/login")
        page.fill("input[name=username]", "bs.a")
        page.fill("input[name=password]", "mat-khau-rat-dai")
        page.click("#login-button")
        page.goto(f"{base}/review/studies/{svc.study['id']}")
        page.wait_for_selector(f"#viewer[data-ready='1'][data-instance='{pa['id']}']")
        canvas = page.locator("#view-canvas")
        total, lit, w, h = canvas.evaluate(sample)
        assert (h, w) == (1024, round(COLS * 1024 / ROWS)) and lit > w * h // 10  # drawn
        page.screenshot(path="/tmp/viewer.png")
        # window/level: a narrower, higher window darkens the image
        page.fill("#win-level-n", "80")
        page.dispatch_event("#win-level-n", "input")
        page.fill("#win-width", "20")
        page.dispatch_event("#win-width", "input")
        page.wait_for_timeout(100)
        assert canvas.evaluate(sample)[0] < total * 0.8
        assert page.input_value("#win-width-n") == "20"
        # the wheel zooms around the cursor; the heat layers sit in the same plane
        before = page.eval_on_selector("#plane", "e => e.style.transform")
        box = page.locator("#viewer").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 3, box["y"] + box["height"] / 3)
        page.mouse.wheel(0, -400)
        page.wait_for_timeout(100)
        after = page.eval_on_selector("#plane", "e => e.style.transform")
        assert after != before and float(re.search(r"scale\(([\d.]+)\)", after)[1]) > float(
            re.search(r"scale\(([\d.]+)\)", before)[1]
        )
        page.screenshot(path=str(out / "viewer_zoomed.png"), full_page=True)
        # the lateral: drawn in the viewer, its reason beside its thumbnail
        page.click(f"#thumb-{ll['id']}")
        page.wait_for_selector(f"#viewer[data-ready='1'][data-instance='{ll['id']}']")
        assert page.locator("#view-canvas").evaluate(sample)[1] > 0
        assert "image=" + ll["id"] in page.url
        assert page.locator(f"#thumb-{ll['id']}").get_attribute("aria-current") == "true"
        assert page.locator("img.heat").count() == 0  # the lateral was not scored
        assert errors == []
        page.screenshot(path=str(out / "viewer_lateral.png"), full_page=True)
        browser.close()
