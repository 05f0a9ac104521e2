"""Every finding keeps the operating point it was judged by, and every result the preprocessing
it went through: the review page, the API and the reports explain a study with what was stored,
never with the model serving today. A site profile's operating points are applied by the
Scorer itself, so a finding positive only under the profile has its heatmap. A real uvicorn
server, SQLite (PostgreSQL for the migration), the exported fixture model and a second file
with other thresholds and preprocessing."""

from __future__ import annotations

import html as html_lib
import re

import httpx
import numpy as np
import pytest
from service_support import (
    dicom_bytes,
    pg_schema_url,
    png_bytes,
    running_service,
    serve_config,
    synth_pixels,
)

from diagnostics.contract import METADATA_KEY, ModelMetadata, Threshold


def _rewrite(source, target, **changes):
    """A copy of the ONNX file `source` at `target` with its metadata changed: another file
    (another sha256) with the same graph."""
    import onnx

    proto = onnx.load(str(source))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    meta = ModelMetadata.from_json(entry.value).model_copy(update=changes)
    entry.value = meta.to_json()
    onnx.save(proto, str(target))
    return target, meta


@pytest.fixture(scope="module")
def model_b(cxr_model, tmp_path_factory):
    """The fixture model under other operating points (every call positive, another policy,
    other validation figures) and another crop: a new version, as a registry would serve it."""
    meta = ModelMetadata.from_json(_metadata_json(cxr_model))
    thresholds = {
        label: Threshold(
            value=1e-6, policy="specificity>=0.99", sensitivity=0.123, specificity=0.987
        )
        for label in meta.labels
    }
    spec = meta.preprocessing.model_copy(
        update={"crop": "center" if meta.preprocessing.crop != "center" else "squash"}
    )
    return _rewrite(
        cxr_model,
        tmp_path_factory.mktemp("model_b") / "model_b.onnx",
        thresholds=thresholds,
        preprocessing=spec,
    )


def _metadata_json(path) -> str:
    import onnx

    proto = onnx.load(str(path))
    return next(p.value for p in proto.metadata_props if p.key == METADATA_KEY)


def _login(svc, user: str) -> httpx.Client:
    c = httpx.Client(base_url=svc.url, follow_redirects=True, timeout=60)
    token = re.search(r'name="csrf" value="([^"]+)"', c.get("/review/login").text).group(1)
    c.post("/review/login", data={"csrf": token, "username": user, "password": "mat-khau-rat-dai"})
    c.get("/review/lang/en")
    return c


def _op_paragraph(html: str, label: str) -> str:
    m = re.search(
        rf'<p class="help operating-point" id="op-{re.escape(label)}"[^>]*>(.*?)</p>', html, re.S
    )
    assert m, f"no operating point shown for {label}"
    return " ".join(html_lib.unescape(m.group(1)).split())


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _forget_operating_points(svc, study_id: str) -> None:
    """Make a study look stored before revision 0005: no operating points, no preprocessing."""
    from sqlalchemy import text

    with svc.store.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE findings SET temperature = NULL, threshold_policy = NULL, "
                "threshold_sensitivity = NULL, threshold_specificity = NULL, "
                "operating_point_source = NULL WHERE study_id = :s"
            ),
            {"s": study_id},
        )
    study = svc.store.get_study(study_id)
    result = {k: v for k, v in study.result.items() if k != "preprocessing"}

    def tx(s):
        from diagnostics.serve.store import Study

        s.get(Study, study_id).result = result

    svc.store.write(tx)


def test_a_study_keeps_the_operating_point_and_preprocessing_of_the_model_that_scored_it(
    cxr_model, model_b, tmp_path
):
    from diagnostics.imaging import decode, resize_square
    from diagnostics.serve.runner import OnnxModel

    path_b, meta_b = model_b
    meta_a = OnnxModel(cxr_model).metadata
    switch = {"to": None}
    cfg = serve_config(
        cxr_model, tmp_path / "serve", qc={"ood": False}, review={"secure_cookies": False}
    )
    with running_service(cfg, model_source=lambda current: switch["to"]) as svc:
        svc.store.create_reviewer("bs.an", "mat-khau-rat-dai", scope=["clinic-a"])
        # not square: the crop policies of A and B give different model views
        px = synth_pixels(1, seed=3100, size=96)[0][:, :72]
        data = png_bytes(px)
        sid = svc.upload(data, filename="a.png", content_type="image/png").json()["id"]
        a = svc.wait(sid)
        assert a["status"] == "scored"
        assert a["result"]["preprocessing"] == meta_a.preprocessing.model_dump(mode="json")
        for f in a["findings"]:
            thr = meta_a.thresholds[f["label"]]
            assert f["operating_point"] == {
                "recorded": True,
                "recovered_from": None,
                "source": "model",
                "threshold": pytest.approx(thr.value),
                "temperature": pytest.approx(meta_a.temperature[meta_a.labels.index(f["label"])]),
                "policy": thr.policy,
                "sensitivity": thr.sensitivity,
                "specificity": thr.specificity,
                "profile_id": None,
            }

        # the service switches to B: other thresholds, policy, figures and crop
        switch["to"] = (path_b, "B")
        holder = svc.app.state.holder
        assert holder.refresh() and holder.model.metadata.thresholds == meta_b.thresholds
        c = _login(svc, "bs.an")
        html = c.get(f"/review/studies/{sid}").text
        for f in a["findings"]:
            thr = meta_a.thresholds[f["label"]]
            shown = _op_paragraph(html, f["label"])
            assert thr.policy in shown and "specificity>=0.99" not in shown
            assert _pct(thr.sensitivity) in shown and "12.3%" not in shown
        assert 'id="preprocessing-unrecorded"' not in html
        api = svc.get(f"/v1/studies/{sid}").json()
        assert [f["operating_point"]["policy"] for f in api["findings"]] == [
            meta_a.thresholds[f["label"]].policy for f in api["findings"]
        ]
        report = svc.get(f"/v1/studies/{sid}/report?format=text", svc.reviewer).text
        assert (
            "specificity>=0.99" not in report
            and meta_a.thresholds[a["findings"][0]["label"]].policy in report
        )
        # the image under the heatmaps is A's view of it, not B's
        png = c.get(f"/review/studies/{sid}/image.png").content
        from io import BytesIO

        from PIL import Image

        shown_px = np.asarray(Image.open(BytesIO(png)), dtype=np.float64) / 255
        pixels = decode(data).pixels
        view_a = resize_square(pixels, meta_a.preprocessing)
        view_b = resize_square(pixels, meta_b.preprocessing)
        assert np.abs(shown_px - view_a).max() < 1 / 255 + 1e-9
        assert np.abs(shown_px - view_b).max() > 0.05

        # a study scored by B says B's
        sid_b = svc.upload(dicom_bytes(synth_pixels(1, seed=3101)[0])).json()["id"]
        b = svc.wait(sid_b)
        assert {f["operating_point"]["policy"] for f in b["findings"]} == {"specificity>=0.99"}
        assert all(f["positive"] and f["threshold"] == pytest.approx(1e-6) for f in b["findings"])
        shown = _op_paragraph(c.get(f"/review/studies/{sid_b}").text, b["findings"][0]["label"])
        assert "specificity>=0.99" in shown and "12.3%" in shown and "98.7%" in shown

        # rows stored before operating points were recorded: recovered from the very file
        # that scored them (B, serving), or said to be unknown (A, no longer served)
        _forget_operating_points(svc, sid)
        _forget_operating_points(svc, sid_b)
        html = c.get(f"/review/studies/{sid}").text
        shown = _op_paragraph(html, a["findings"][0]["label"])
        assert "not known" in shown and "specificity>=0.99" not in shown
        assert 'id="preprocessing-unrecorded"' in html  # the image: B's view, and it says so
        assert (
            svc.get(f"/v1/studies/{sid}").json()["findings"][0]["operating_point"]["recorded"]
            is False
        )
        html = c.get(f"/review/studies/{sid_b}").text
        shown = _op_paragraph(html, b["findings"][0]["label"])
        assert "specificity>=0.99" in shown and "Read from the model file" in shown
        assert 'id="preprocessing-unrecorded"' not in html  # B's own study: B's spec is right


def test_a_finding_positive_only_under_the_site_profile_has_its_heatmap(cxr_model, tmp_path):
    from diagnostics.serve.runner import OnnxModel, Scorer

    model = OnnxModel(cxr_model)
    # an image with a finding the model itself calls negative
    scorer = Scorer(model, None)
    for seed in range(3200, 3220):
        px = synth_pixels(1, seed=seed)[0]
        res = scorer.score(dicom_bytes(px, uid_seed=str(seed)))
        negative = [f.label for f in res.findings if f.positive is False]
        if res.status == "scored" and negative:
            break
    else:
        pytest.skip("the fixture model called every finding positive on 20 images")
    label = negative[0]
    cfg = serve_config(
        cxr_model, tmp_path / "serve", qc={"ood": False}, review={"secure_cookies": False}
    )
    with running_service(cfg) as svc:
        svc.store.create_reviewer("bs.an", "mat-khau-rat-dai", scope=["clinic-a"])
        profile = svc.store.save_profile(
            model_sha256=model.sha256,
            site="clinic-a",
            temperatures={label: 1.0},
            thresholds={label: 0.0},  # everything is positive for this site
            policy="sensitivity>=0.99",
            evidence={
                label: {
                    "n": 200,
                    "policy": "sensitivity>=0.99",
                    "after": {"sensitivity": 1.0, "specificity": 0.25},
                }
            },
            created_by="test",
        )
        a = svc.wait(svc.upload(dicom_bytes(px)).json()["id"])
        b = svc.wait_stored(svc.upload(dicom_bytes(px), key=svc.other_clinic).json()["id"])
        fa = {f["label"]: f for f in a["findings"]}
        fb = {f["label"]: f for f in b["findings"]}
        assert fb[label]["positive"] is False and fb[label]["heatmap"] is None  # the model's
        assert fa[label]["positive"] is True and fa[label]["heatmap"]  # the site's: a heatmap
        assert (svc.data_dir / "heatmaps" / fa[label]["heatmap"]).is_file()
        assert fa[label]["site_profile"] == profile.id and a["result"]["site_profile"] == profile.id
        op = fa[label]["operating_point"]
        assert op["source"] == "site_profile" and op["profile_id"] == profile.id
        assert op["threshold"] == 0.0 and op["policy"] == "sensitivity>=0.99"
        assert op["sensitivity"] == 1.0 and op["specificity"] == 0.25
        others = [f for f in a["findings"] if f["label"] != label]
        assert all(f["operating_point"]["source"] == "model" for f in others)
        assert svc.get(f"/v1/studies/{a['id']}/heatmaps/{label}").status_code == 200
        c = _login(svc, "bs.an")
        shown = _op_paragraph(c.get(f"/review/studies/{a['id']}").text, label)
        assert "This site's own threshold" in shown and "25.0%" in shown
        assert "sensitivity>=0.99" in shown


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    from diagnostics.serve.store import Store

    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path}/s.db", tmp_path / "blobs")
        yield s
        s.close()
    else:
        gen = pg_schema_url()
        s = Store(next(gen), tmp_path / "blobs")
        yield s
        s.close()
        next(gen, None)


def _alembic(store, action: str, revision: str) -> None:

    from alembic import command
    from alembic.config import Config

    import diagnostics.serve.store as store_module

    cfg = Config()
    cfg.set_main_option("script_location", str(store_module.MIGRATIONS_DIR))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)


def test_migration_0005_keeps_older_findings_and_says_they_were_not_recorded(store):
    from sqlalchemy import text

    _alembic(store, "upgrade", "0004")
    store.ensure_clinic("c1")
    sid = "s" * 32
    with store.engine.begin() as conn:  # a study as revision 0004 stored it (one file)
        conn.execute(
            text(
                "INSERT INTO studies (id, clinic_id, status, content_sha256, size_bytes, format, "
                "original_filename, result, created_at, updated_at) VALUES (:s, 'c1', 'scored', "
                ":h, 1, 'png', 'a.png', '{}', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ),
            {"s": sid, "h": "0" * 64},
        )
    study = type("Old", (), {"id": sid})
    profile = store.save_profile(
        model_sha256="m" * 64,
        site="c1",
        temperatures={"Effusion": 1.5},
        thresholds={"Effusion": 0.3},
        policy="model's own",
        evidence={
            "Effusion": {"policy": "youden", "after": {"sensitivity": 0.8, "specificity": 0.7}}
        },
        created_by="t",
    )
    with store.engine.begin() as conn:  # two findings as revision 0004 stored them
        for label, pid in (("Pneumonia", None), ("Effusion", profile.id)):
            conn.execute(
                text(
                    "INSERT INTO findings (study_id, label, probability, threshold, positive, "
                    "model_sha256, model_version, preprocess_version, provider, heatmap, "
                    "created_at, logit, profile_id) VALUES (:s, :l, 0.7, 0.3, true, :m, '1', "
                    "'1', 'CPUExecutionProvider', NULL, CURRENT_TIMESTAMP, 0.8, :p)"
                ),
                {"s": study.id, "l": label, "m": "m" * 64, "p": pid},
            )
    store.migrate()  # to head: 0005, then 0006 (the study's file becomes its one image)
    (image,) = store.study_instances(study.id)
    assert (image.position, image.status, image.content_sha256) == (1, "scored", "0" * 64)
    found = {f["label"]: f["operating_point"] for f in store.study_view(study.id)["findings"]}
    assert found["Pneumonia"] == {
        "recorded": False,
        "recovered_from": None,
        "source": None,
        "threshold": 0.3,
        "temperature": None,
        "policy": None,
        "sensitivity": None,
        "specificity": None,
        "profile_id": None,
    }
    assert found["Effusion"]["recorded"] is False  # its site profile still explains it
    assert found["Effusion"]["recovered_from"] == "site_profile"
    assert found["Effusion"]["policy"] == "youden" and found["Effusion"]["specificity"] == 0.7
    _alembic(store, "downgrade", "0004")  # and back: the findings stay
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM findings")).scalar() == 2
    store.migrate()
