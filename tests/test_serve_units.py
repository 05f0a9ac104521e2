"""Runner, QC, OOD, batch scoring CLI, store rules and service settings, without a server."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from conftest import shared
from service_support import colour_photo, dicom_bytes, pg_schema_url, png_bytes, synth_pixels
from typer.testing import CliRunner

from diagnostics.imaging import DecodedImage
from diagnostics.serve import qc
from diagnostics.serve.runner import OnnxModel, Scorer

# --------------------------------------------------------------------------- OOD


def test_ood_reference_scores_training_like_points_near_one_and_far_points_high():
    from diagnostics.train.ood import fit_reference

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(16, 64))  # 16 latent factors -> 64 correlated features

    def draw(n: int) -> np.ndarray:
        return rng.normal(size=(n, 16)) @ mix + 0.1 * rng.normal(size=(n, 64)) + 3.0

    train, val = draw(800), draw(200)
    ref = fit_reference(train, val, components=8, quantile=0.99, margin=1.5)
    det = qc.OODDetector(ref)
    assert 0.5 < np.median(det.score(val)) < 1.5
    assert ref.threshold == pytest.approx(np.quantile(det.score(val), 0.99) * 1.5, rel=1e-5)
    far = val[:5] + 40.0
    assert (det.score(far) > ref.threshold).all()
    assert det.check(float(det.score(val[:1])[0])).passed
    refused = det.check(float(det.score(far[:1])[0]))
    assert not refused.passed and refused.code == "out_of_distribution"
    assert not det.check(float("nan")).passed


def test_real_extremity_radiograph_is_out_of_distribution_by_the_model_itself(cxr_model):
    """With the tag checks widened, the OOD check alone refuses the shared RLE extremity."""
    data = shared("dicom", "WG04_RG3_RLE.dcm").read_bytes()
    cfg = qc.QCConfig(body_parts=["CHEST", "EXTREMITY"])
    res = Scorer(OnnxModel(cxr_model), cfg).score(data)
    assert res.status == "failed_qc" and res.code == "out_of_distribution", res.as_dict()
    assert res.findings == []


def test_training_like_images_pass_the_ood_check(cxr_model):
    scorer = Scorer(OnnxModel(cxr_model))
    results = scorer.score_many([png_bytes(p) for p in synth_pixels(12, seed=321)])
    passed = sum(r.status == "scored" for r in results)
    assert passed >= 11, [r.ood_score for r in results]  # threshold: val q99.5 x 1.5


# --------------------------------------------------------------------------- image QC


def _image(pixels: np.ndarray, chroma: float = 0.0, **tags) -> DecodedImage:
    return DecodedImage(pixels.astype(np.float32), "png", 8, "MONOCHROME2", dict(tags), chroma)


def test_image_checks():
    cfg = qc.QCConfig()
    ok = [r for r in qc.check_image(_image(synth_pixels(1)[0]), cfg) if not r.passed]
    assert ok == []
    codes = {r.code for r in qc.check_image(_image(np.full((80, 80), 0.3)), cfg) if not r.passed}
    assert codes == {"constant_image"}
    codes = {r.code for r in qc.check_image(_image(np.zeros((32, 200))), cfg) if not r.passed}
    assert "image_too_small" in codes
    tiny_noise = np.full((80, 80), 0.3) + np.random.default_rng(0).normal(0, 0.001, (80, 80))
    assert "constant_image" in {r.code for r in qc.check_image(_image(tiny_noise), cfg)}


def test_colour_is_measured_before_grey_conversion():
    from diagnostics.imaging import decode

    assert decode(colour_photo()).chroma > 0.2
    kermany = next(iter(sorted(shared("cxr", "kermany224").rglob("*.jpeg"))))
    assert decode(kermany).chroma < 0.02  # RGB JPEG of a grey film


def test_intake_reads_tags_without_decoding_pixels():
    (px,) = synth_pixels(1)
    info, results = qc.check_intake(dicom_bytes(px, uid_seed="x"), qc.QCConfig())
    assert info.format == "dicom" and info.sop_instance_uid and all(r.passed for r in results)
    with pytest.raises(qc.QCRefusal) as err:
        qc.check_intake(dicom_bytes(px, Modality="CT"), qc.QCConfig())
    assert err.value.code == "modality_not_supported"


# --------------------------------------------------------------------------- runner


def _nan_model(src, dst):
    """The fixture model with its logits multiplied by NaN: a broken export."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(src))
    g = proto.graph
    for node in g.node:
        for i, out in enumerate(node.output):
            if out == "logits":
                node.output[i] = "logits_raw"
    nan = helper.make_tensor("nan_scale", onnx.TensorProto.FLOAT, [], [float("nan")])
    g.initializer.append(nan)
    g.node.append(helper.make_node("Mul", ["logits_raw", "nan_scale"], ["logits"]))
    onnx.save(proto, str(dst))
    return dst


def test_nan_output_fails_the_job_and_is_never_a_score(cxr_model, tmp_path):
    model = OnnxModel(_nan_model(cxr_model, tmp_path / "nan.onnx"))
    res = Scorer(model).score(png_bytes(synth_pixels(1)[0]))
    assert res.status == "failed" and res.code == "non_finite_output"
    assert res.findings == []
    json.dumps(res.as_dict(), allow_nan=False)  # the record itself is valid JSON


def test_integrity_check_and_batching(cxr_model):
    from diagnostics.serve.runner import ModelIntegrityError, file_sha256

    with pytest.raises(ModelIntegrityError):
        OnnxModel(cxr_model, expected_sha256="0" * 64)
    m = OnnxModel(cxr_model, expected_sha256=file_sha256(cxr_model).upper(), threads=1)
    assert m.max_batch is None  # dynamic batch
    data = [png_bytes(p) for p in synth_pixels(5, seed=42)]
    one_by_one = [Scorer(m, batch_size=1).score(d) for d in data]
    batched = Scorer(m, batch_size=4).score_many(data)
    for a, b in zip(one_by_one, batched, strict=True):
        assert a.status == b.status
        for fa, fb in zip(a.findings, b.findings, strict=True):
            assert fa.probability == pytest.approx(fb.probability, abs=1e-6)


def _same_results(model, data: list[bytes]) -> list:
    """Side by side and one at a time give equal results, in order."""
    serial = Scorer(model, batch_size=3, parallel_decode=False)
    side = Scorer(model, batch_size=3)
    assert side.parallel_decode and side.decode_threads == 2
    started: set[str] = set()
    prepare = side._prepare

    def spy(item: bytes):  # records which threads prepared an input
        started.add(threading.current_thread().name)
        return prepare(item)

    side._prepare = spy  # type: ignore[method-assign]
    a, b = serial.score_many(data), side.score_many(data)
    assert started and all(name.startswith("prepare") for name in started)
    assert [r.status for r in a] == [r.status for r in b]
    assert [r.code for r in a] == [r.code for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert [f.probability for f in ra.findings] == [f.probability for f in rb.findings]
        assert [q.code for q in ra.qc] == [q.code for q in rb.qc]
        assert ra.image == rb.image
    return a


def test_side_by_side_decode_gives_the_same_results_in_order(cxr_model):
    """A batch runner decodes a call's images on the decode threads: every result (a refused
    colour photo, an unreadable file, and inputs over 1 Mpx, whose block average is itself
    split over the decode threads, among them) equals one-at-a-time decoding, in order."""
    m = OnnxModel(cxr_model, threads=2)
    data = [png_bytes(p) for p in synth_pixels(4, seed=7)]
    big = synth_pixels(2, seed=8, size=1100)
    data[1:1] = [colour_photo(), b"\x89PNG\r\n\x1a\n not a png", png_bytes(big[0])]
    data.append(dicom_bytes(big[1]))
    a = _same_results(m, data)
    assert a[1].code and a[2].code  # refused and unreadable, in their places
    assert a[3].image["rows"] == 1100 and a[-1].image["format"] == "dicom"


def test_side_by_side_decode_of_real_files(cxr_model):
    """The same on the real JPEG 2000, uncompressed and JPEG-LS chests and NIH PNGs."""
    dicoms = [
        shared("dicom", n) for n in ("pydicom-data_RG1_J2KR.dcm", "pydicom-data_RG1_UNCR.dcm")
    ]
    pngs = sorted((shared("cxr") / "nih_sample" / "images").glob("*.png"))[:3]
    data = [p.read_bytes() for p in [*dicoms, *pngs, shared("dicom", "WG04_RG1_JLSN.dcm")]]
    _same_results(OnnxModel(cxr_model, threads=2), data)


def test_heatmaps_for_positive_findings(cxr_model, tmp_path):
    from PIL import Image

    m = OnnxModel(cxr_model)
    scorer = Scorer(m, heatmap_dir=tmp_path)
    results = scorer.score_many([png_bytes(p) for p in synth_pixels(8, seed=77)])
    positives = [f for r in results for f in r.findings if f.positive]
    negatives = [f for r in results for f in r.findings if not f.positive]
    assert positives, "the fixture model should call some findings positive"
    for f in positives:
        img = Image.open(tmp_path / f.heatmap)
        assert img.mode == "RGB" and img.size == (64, 64)
    assert all(f.heatmap is None for f in negatives)


# --------------------------------------------------------------------------- batch CLI


def test_score_command(cxr_model, tmp_path):
    from diagnostics.cli import app

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(png_bytes(synth_pixels(1, seed=5)[0]))
    (folder / "chest.dcm").write_bytes(dicom_bytes(synth_pixels(1, seed=6)[0]))
    (folder / "flat.png").write_bytes(png_bytes(np.full((90, 90), 0.5)))
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "notes.dcm").write_bytes(b"this is text")
    (folder / "README.txt").write_text("not an input")  # read too: the content decides
    (folder / "1.2.840.113619.2.55.3").write_bytes(dicom_bytes(synth_pixels(1, seed=7)[0]))
    runner = CliRunner()
    out = tmp_path / "f.jsonl"
    r = runner.invoke(
        app,
        [
            "score",
            str(folder),
            str(tmp_path / "gone.dcm"),
            "--model",
            str(cxr_model),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    records = {
        json.loads(line)["input"].split("/")[-1]: json.loads(line)
        for line in out.read_text().splitlines()
    }
    assert set(records) == {
        "good.png",
        "chest.dcm",
        "flat.png",
        "empty.dcm",
        "notes.dcm",
        "README.txt",
        "1.2.840.113619.2.55.3",
        "gone.dcm",
    }
    assert records["good.png"]["status"] == "scored"
    assert records["chest.dcm"]["status"] == "scored"
    assert records["1.2.840.113619.2.55.3"]["status"] == "scored"  # DICOM named by its UID
    assert records["flat.png"]["code"] == "constant_image"
    assert records["empty.dcm"]["code"] == "empty_file"
    assert records["notes.dcm"]["code"] == "unsupported_format"
    assert records["README.txt"]["code"] == "unsupported_format"
    assert records["gone.dcm"]["code"] == "not_found"
    for rec in records.values():  # heatmaps are named by content, never by position
        for f in rec.get("findings", []):
            assert f["heatmap"] is None or (tmp_path / "f_heatmaps" / f["heatmap"]).is_file()
    assert records["good.png"]["provider"] == "CPUExecutionProvider"
    csv_out = tmp_path / "f.csv"
    r = runner.invoke(
        app, ["score", str(folder / "good.png"), "--model", str(cxr_model), "--out", str(csv_out)]
    )
    assert r.exit_code == 0, r.output
    import pandas as pd

    table = pd.read_csv(csv_out)
    assert len(table) == 1 and table.loc[0, "status"] == "scored"
    assert {f"{label}_probability" for label in OnnxModel(cxr_model).labels} <= set(table.columns)
    # fatal: no model, or a missing input
    r = runner.invoke(app, ["score", str(folder), "--model", str(tmp_path / "none.onnx")])
    assert r.exit_code == 2 and "model file not found" in r.output
    r = runner.invoke(app, ["score", str(tmp_path / "nope"), "--model", str(cxr_model)])
    assert r.exit_code == 2


# --------------------------------------------------------------------------- store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    from diagnostics.serve.store import Store

    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path}/s.db", tmp_path / "blobs")
        s.migrate()
        yield s
        s.close()
    else:
        gen = pg_schema_url()
        url = next(gen)
        s = Store(url, tmp_path / "blobs")
        s.migrate()
        yield s
        s.close()
        next(gen, None)


def test_migrations_match_the_models(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from diagnostics.serve.store import Base

    store.migrate()  # idempotent
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def _study(store, n=1):
    out = []
    for i in range(n):
        sha = f"{i:064x}"
        study, _ = store.create_study(
            clinic="c1",
            actor="t",
            sha256=sha,
            size=1,
            fmt="png",
            filename="a.png",
            sop_uid=None,
            idempotency_key=None,
            max_attempts=2,
        )
        out.append(study)
    return out


def test_nan_scores_are_never_stored(store):
    (study,) = _study(store)
    ((job, _),) = store.claim("w", 30)
    bad = {
        "label": "Pneumonia",
        "probability": float("nan"),
        "threshold": 0.5,
        "positive": False,
        "heatmap": None,
        "model_sha256": "x",
        "model_version": None,
        "preprocess_version": "1",
        "provider": "cpu",
    }
    with pytest.raises(ValueError, match="non-finite"):
        store.complete(job.id, "w", job.attempts, status="scored", result={}, findings=[bad])
    assert store.study_view(study.id)["findings"] == []
    assert store.get_study(study.id).status == "running"  # untouched, lease still held


def test_lease_expiry_bounded_attempts_then_failed_and_visible(store):
    (study,) = _study(store)
    assert len(store.claim("w1", 0.0)) == 1  # attempt 1; lease expires at once
    import time

    time.sleep(0.01)
    ((job, _),) = store.claim("w2", 0.0)  # reclaimed: attempt 2 (= max)
    assert job.attempts == 2
    # the first worker's late result is refused: it no longer holds the lease
    from diagnostics.serve.store import LeaseLost

    with pytest.raises(LeaseLost):
        store.complete(job.id, "w1", 1, status="scored", result={}, findings=[])
    time.sleep(0.01)
    assert store.claim("w3", 30.0) == []  # past max attempts: failed, not claimed
    view = store.study_view(study.id)
    assert view["status"] == "failed" and view["error_code"] == "worker_lost"
    assert study.id in {s["id"] for s in store.worklist(None)}  # reviewers see it
    actions = [a.action for a in store.audit_rows(study.id)]
    assert actions == [
        "study.upload",
        "instance.received",
        "study.queued",
        "study.running",
        "study.reclaimed",
        "study.failed",
    ]


def test_blob_commit_is_atomic_and_content_addressed(tmp_path):
    import hashlib

    from diagnostics.serve.store import BlobStore

    blobs = BlobStore(tmp_path)
    data = b"abc" * 100
    sha = hashlib.sha256(data).hexdigest()
    tmp = blobs.temp_file()
    tmp.write_bytes(data)
    path = blobs.commit(tmp, sha)
    assert path == blobs.path(sha) and path.read_bytes() == data and not tmp.exists()
    with pytest.raises(ValueError):
        blobs.path("../../etc/passwd")


# --------------------------------------------------------------------------- settings, keys


def test_auth_off_needs_loopback_and_dev_flag():
    from diagnostics.serve.config import ServeConfig, check_auth_setting

    check_auth_setting(ServeConfig(auth=False, host="127.0.0.1"), dev=True)
    with pytest.raises(ValueError, match="loopback"):
        check_auth_setting(ServeConfig(auth=False, host="127.0.0.1"), dev=False)
    with pytest.raises(ValueError, match="loopback"):
        check_auth_setting(ServeConfig(auth=False, host="0.0.0.0"), dev=True)


def test_serve_refuses_auth_off_on_a_public_address(home):
    from diagnostics.cli import app

    r = CliRunner().invoke(app, ["serve", "--set", "auth=false", "--host", "0.0.0.0", "--dev"])
    assert r.exit_code == 2 and "loopback" in r.output


def test_keys_commands(home):
    from diagnostics.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["keys", "create", "--role", "submitter", "--clinic", "tram-y-te-1"])
    assert r.exit_code == 0, r.output
    key_id, key = r.stdout.split()[0], r.stdout.splitlines()[1]
    assert key.startswith("dk_")
    listed = runner.invoke(app, ["keys", "list"]).stdout
    assert key_id in listed and key not in listed and "active" in listed
    r = runner.invoke(app, ["keys", "rotate", key_id])
    assert r.exit_code == 0 and "revoked" in r.stdout
    assert "revoked" in runner.invoke(app, ["keys", "list"]).stdout
    r = runner.invoke(app, ["keys", "create", "--role", "reviewer"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["keys", "revoke", "key_nope"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["keys", "revoke", key])  # the secret instead of the ID
    assert r.exit_code == 2 and key not in r.output
    r = runner.invoke(app, ["keys", "create", "--role", "admin", "--clinic", "x"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["keys", "create", "--role", "submitter", "--clinic", "Bad Clinic!"])
    assert r.exit_code == 2 and "clinic code" in r.output
    # the database and its write-ahead log, where recent commits live until a checkpoint
    db = b"".join(f.read_bytes() for f in (home / "serve").glob("service.db*"))
    from diagnostics.serve.store import hash_key

    assert key.encode() not in db and hash_key(key).encode() in db  # only the hash is stored
