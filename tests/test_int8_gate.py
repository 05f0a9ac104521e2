"""int8 at the clinic, behind a gate: the gate recorded at training time (file metadata, MLflow
run and model version), the clinic's choice of precision (int8 only with a passed gate and
VNNI/AMX; fp32 otherwise, saying why), the registry's int8 artefact checked by sha256, and
the int8 path's accuracy within the gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import diagnostics_home, tiny_cxr_config

VNNI = {"fpu", "avx2", "avx512f", "avx512_vnni"}
NO_VNNI = {"fpu", "sse4_2", "avx2"}
NAME = "int8-gate"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A tiny CNN trained with `eval.int8: true`, tracked and registered in its own home."""
    from diagnostics.data.synthetic import write_dataset
    from diagnostics.train.cxr import train_cxr

    root = tmp_path_factory.mktemp("int8_model")
    manifest = write_dataset(root / "data", 320, size=64, seed=11)
    # width 16 and 160 validation images: a tiny 8-wide CNN on 50 images moves a finding's
    # AUROC by 0.008-0.013 in int8 (measured), and its gate fails, as it should
    cfg = tiny_cxr_config(
        manifest,
        name="int8",
        size=64,
        width=16,
        blocks=3,
        val=0.5,
        train={"epochs": 4, "batch_size": 16, "lr": 0.003},
        tracking={"experiment": "int8", "registered_model": NAME},
    )
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"int8": True})})
    with diagnostics_home(root / "home"):
        result = train_cxr(cfg, progress=False)
    return result, root / "home", manifest


def _gate_of(path: Path):
    from diagnostics.serve.precision import read_metadata

    return read_metadata(path).int8_gate


def _with_gate(src: Path, dest: Path, **changes) -> Path:
    """A copy of an int8 file whose recorded gate has `changes` (e.g. passed=False)."""
    import onnx

    from diagnostics.contract import METADATA_KEY, ModelMetadata

    proto = onnx.load(str(src))
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            meta = ModelMetadata.from_json(entry.value)
            assert meta.int8_gate is not None
            gate = meta.int8_gate.model_copy(update=changes)
            entry.value = meta.model_copy(update={"int8_gate": gate}).to_json()
    onnx.save(proto, str(dest))
    return dest


def test_the_gate_is_recorded_in_the_file_and_in_mlflow(trained):
    import mlflow

    from diagnostics.contract import file_sha256

    result, home, _ = trained
    int8_path = result.onnx_path.with_name("model.int8.onnx")
    gate = _gate_of(int8_path)
    assert gate is not None and gate.reason == result.int8["gate"]
    assert gate.n > 0
    assert gate.n_cam > 0 and gate.cam_correlation is not None and gate.same_peak is not None
    assert set(gate.auroc_deltas) <= set(result.findings)
    assert result.int8["sha256"] == file_sha256(int8_path)  # the file as it is, gate written
    with diagnostics_home(home):
        from diagnostics.settings import get_settings

        mlflow.set_tracking_uri(get_settings().mlflow_uri())
        client = mlflow.MlflowClient()
        run = client.get_run(result.run_id)
        assert run.data.tags["int8_gate"] == gate.reason
        assert run.data.tags["onnx_int8_sha256"] == file_sha256(int8_path)
        assert run.data.metrics["int8.gate_passed"] == float(gate.passed)
        mv = client.get_model_version(NAME, result.model_version)
        assert mv.tags["onnx_int8_sha256"] == file_sha256(int8_path)
        assert mv.tags["onnx_sha256"] == result.sha256
        assert mv.tags["int8_gate"] == gate.reason
        assert mv.tags["onnx_int8_path"] == "int8/model.int8.onnx"
        # a local store: the clinic reads the version's int8 artefact with mlflow, checked
        from diagnostics.cli.registry import resolve_int8

        path, note = resolve_int8(
            f"models:/{NAME}/{result.model_version}", result.onnx_path, result.model_version
        )
        assert note == "" and path is not None and file_sha256(path) == file_sha256(int8_path)
        # copied once into the cache, not a temporary folder; found there the next time
        assert "registry-int8" in path.parts and result.model_version in path.parts
        again, _ = resolve_int8(
            f"models:/{NAME}/{result.model_version}", result.onnx_path, result.model_version
        )
        assert again == path


def test_int8_accuracy_is_within_the_gate(trained):
    """The int8 path's tolerance, proven on the validation split: every finding's AUROC within
    0.005 of fp32's, the CAMs alike, probabilities close."""
    result, _, _ = trained
    gate = _gate_of(result.onnx_path.with_name("model.int8.onnx"))
    assert gate.passed, gate.reason
    assert gate.auroc_delta is not None and gate.auroc_delta <= 0.005
    assert all(abs(d) <= 0.005 for d in gate.auroc_deltas.values())
    assert gate.cam_correlation >= 0.95 and gate.same_peak >= 0.95
    assert result.int8["max_prob_diff"] < 0.05 and result.int8["mean_prob_diff"] < 0.01


# --------------------------------------------------------------------------- the CPU


def test_cpu_flags_from_a_faked_cpuinfo(tmp_path):
    from diagnostics.serve.precision import cpu_flags, int8_acceleration

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2 avx512_vnni\n\nprocessor\t: 1\n")
    assert "avx512_vnni" in cpu_flags(info)
    assert int8_acceleration(cpu_flags(info)) == "avx512_vnni"
    assert int8_acceleration({"avx_vnni"}) == "avx_vnni"
    assert int8_acceleration({"amx_int8", "avx512_vnni"}) == "amx_int8"
    assert int8_acceleration(NO_VNNI) is None
    assert cpu_flags(tmp_path / "absent") == set()


# --------------------------------------------------------------------------- the clinic's choice


@pytest.fixture
def local_pair(trained, tmp_path):
    """model.onnx and model.int8.onnx (gate passed) in a folder of their own."""
    result, _, _ = trained
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(result.onnx_path, folder / "model.onnx")
    _with_gate(
        result.onnx_path.with_name("model.int8.onnx"),
        folder / "model.int8.onnx",
        passed=True,
        reason="passed",
    )
    return folder / "model.onnx"


def _load(path: Path, precision: str, flags: set[str]):
    from diagnostics.cli.serve import load_clinic_model

    return load_clinic_model(
        str(path), path, None, precision=precision, device="cpu", threads=1, flags=flags
    )


def test_the_clinic_picks_int8_only_behind_the_gate_and_vnni(local_pair):
    from diagnostics.serve.precision import PrecisionError

    model = _load(local_pair, "auto", VNNI)
    assert model.precision == "int8" and model.path.name == "model.int8.onnx"
    assert "avx512_vnni" in model.precision_reason
    d = model.describe()
    assert d["precision"] == "int8" and d["int8_gate"]["passed"]

    no_vnni = _load(local_pair, "auto", NO_VNNI)
    assert no_vnni.precision == "fp32" and "no VNNI or AMX" in no_vnni.precision_reason
    assert _load(local_pair, "fp32", VNNI).precision == "fp32"
    with pytest.raises(PrecisionError, match="no VNNI"):
        _load(local_pair, "int8", NO_VNNI)

    _with_gate(
        local_pair.with_name("model.int8.onnx"),
        local_pair.with_name("model.int8.onnx"),
        passed=False,
        reason="failed:auroc_delta 0.0100 > 0.005 (Pneumonia)",
    )
    failed = _load(local_pair, "auto", VNNI)
    assert failed.precision == "fp32" and "failed its accuracy gate" in failed.precision_reason
    with pytest.raises(PrecisionError, match="accuracy gate"):
        _load(local_pair, "int8", VNNI)

    local_pair.with_name("model.int8.onnx").unlink()
    alone = _load(local_pair, "auto", VNNI)
    assert alone.precision == "fp32" and "no int8 file" in alone.precision_reason


def test_health_and_findings_say_the_precision(local_pair, tmp_path, monkeypatch):
    """`serve`'s loader with faked VNNI flags: /health/ready's model check and every result
    say int8; with model.precision fp32 they say fp32."""
    from fastapi.testclient import TestClient
    from service_support import ingest_direct, png_bytes, serve_config, synth_pixels

    from diagnostics.cli.serve import _load_service_model
    from diagnostics.serve import precision
    from diagnostics.serve.app import create_app
    from diagnostics.serve.runner import Scorer
    from diagnostics.serve.store import Store

    info = tmp_path / "cpuinfo"
    info.write_text("flags\t: fpu avx2 amx_int8\n")
    monkeypatch.setattr(precision, "CPUINFO", info)
    image = png_bytes(synth_pixels(1, seed=7)[0])
    for mode, expected in (("auto", "int8"), ("fp32", "fp32")):
        data_dir = tmp_path / f"serve-{mode}"
        cfg = serve_config(
            local_pair,
            data_dir,
            model={"precision": mode},
            qc={"ood": False},
            worker={"in_process": False},
        )
        model = _load_service_model(cfg)
        assert model.precision == expected
        record = Scorer(model, cfg.qc).score(image).as_dict()
        assert record["precision"] == expected and record["model_sha256"] == model.sha256
        store = Store(cfg.resolved_database_url(data_dir.parent), data_dir / "blobs")
        store.migrate()
        try:
            app = create_app(cfg, model, store, data_dir, None, {})
            ready = TestClient(app).get("/health/ready").json()
            # every stored finding says the precision it was scored in
            study = ingest_direct(cfg, store, image).study
            app.state.worker.run_once()
            findings = store.study_view(study.id)["findings"]
            assert findings and {f["precision"] for f in findings} == {expected}
        finally:
            store.close()
        check = ready["checks"]["model"]
        assert check["precision"] == expected, check
        assert check["precision_reason"] == model.precision_reason
        assert ("amx_int8" in check["precision_reason"]) == (expected == "int8")


# --------------------------------------------------------------------------- the registry


def _fake_registry(fp32: Path, int8: Path, int8_sha: str):
    """A tracking server's REST answers for one version with an int8 artefact (proxied)."""
    from diagnostics.contract import file_sha256

    files = {
        "model/model.onnx": fp32.read_bytes(),
        "run/artifacts/int8/model.int8.onnx": int8.read_bytes(),
        "model/MLmodel": b"flavors:\n  onnx:\n    data: model.onnx\n",
    }
    mv = {
        "name": NAME,
        "version": "3",
        "run_id": "r1",
        "tags": [
            {"key": "onnx_sha256", "value": file_sha256(fp32)},
            {"key": "onnx_int8_sha256", "value": int8_sha},
            {"key": "onnx_int8_path", "value": "int8/model.int8.onnx"},
            {"key": "int8_gate", "value": "passed"},
        ],
    }
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        calls.append(path)
        if path.endswith("/model-versions/get"):
            return httpx.Response(200, json={"model_version": mv})
        if path.endswith("/model-versions/get-download-uri"):
            return httpx.Response(200, json={"artifact_uri": "mlflow-artifacts:/model"})
        if path.endswith("/runs/get"):
            return httpx.Response(
                200, json={"run": {"info": {"artifact_uri": "mlflow-artifacts:/run/artifacts"}}}
            )
        prefix = "/api/2.0/mlflow-artifacts/artifacts/"
        if path.startswith(prefix) and path[len(prefix) :] in files:
            return httpx.Response(200, content=files[path[len(prefix) :]])
        return httpx.Response(404, json={"message": f"no {path}"})

    return httpx.MockTransport(handler), calls


def test_the_registry_int8_artefact_is_downloaded_and_checked(local_pair, tmp_path):
    from diagnostics.contract import file_sha256
    from diagnostics.serve.registry_client import RegistryClient

    int8 = local_pair.with_name("model.int8.onnx")
    transport, _ = _fake_registry(local_pair, int8, file_sha256(int8))
    with RegistryClient("http://registry:5000", tmp_path / "c", transport=transport) as client:
        found = client.resolve(f"models:/{NAME}/3", int8=True)
        assert found.sha256 == file_sha256(local_pair) and found.int8_note == ""
        assert found.int8_path is not None and file_sha256(found.int8_path) == file_sha256(int8)
        assert found.int8_path == tmp_path / "c" / "sha256" / f"{file_sha256(int8)}.onnx"
        refs = json.loads((tmp_path / "c" / "refs.json").read_text())
        assert refs[f"models:/{NAME}/3"]["int8_sha256"] == file_sha256(int8)
        assert client.resolve(f"models:/{NAME}/3").int8_path is None  # only when asked

    # a recorded sha256 that the artefact does not have: not used, fp32 serves, and why
    transport, _ = _fake_registry(local_pair, int8, "0" * 64)
    with RegistryClient("http://registry:5000", tmp_path / "d", transport=transport) as client:
        found = client.resolve(f"models:/{NAME}/3", int8=True)
    assert found.int8_path is None and "training recorded 000000000000" in found.int8_note
    assert not any(p.name.startswith("0" * 12) for p in (tmp_path / "d" / "sha256").iterdir())
    from diagnostics.serve.precision import choose

    choice = choose("auto", found.path, found.int8_path, missing=found.int8_note, flags=VNNI)
    assert choice.precision == "fp32" and "training recorded" in choice.reason


# --------------------------------------------------------------------------- models compare


def test_models_compare_fp32_with_int8(trained, tmp_path):
    """`diagnostics models compare MODEL --int8`: both files of one model on the same images."""
    import yaml
    from typer.testing import CliRunner

    from diagnostics.cli import app

    result, _, manifest = trained
    data = tmp_path / "data.yaml"
    data.write_text(
        yaml.safe_dump(
            {
                "source": "manifest",
                "labels_file": str(manifest),
                "split": {"fractions": {"train": 0.5, "val": 0.5}},
            }
        )
    )
    out = tmp_path / "cmp"
    args = ["models", "compare", str(result.onnx_path), "--int8", "-c", str(data)]
    run = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert run.exit_code == 0, run.output
    report = json.loads((out / "compare.json").read_text())
    assert report["dataset"]["images"] > 100 and report["gate"]["passed"]
    assert set(report["ms_per_image"]) == {"fp32", "int8"}
    assert all(v > 0 for v in report["ms_per_image"].values())
    assert report["max_prob_diff"] < 0.05 and report["call_agreement"] > 0.9
    for row in report["findings"].values():
        assert abs(row["auroc_diff"]) <= 0.01 and 0.0 <= row["call_agreement"] <= 1.0
    assert "AUROC int8" in run.output and "ms" in run.output
    bad = CliRunner().invoke(app, [*args[:3], "other.onnx", "--int8", "-c", str(data)])
    assert bad.exit_code != 0 and "no baseline" in bad.output


# --------------------------------------------------------------------------- gate arithmetic


def test_gate_uses_the_worst_finding_and_the_cam_sample():
    from diagnostics.train.int8_gate import evaluate_gate

    rng = np.random.default_rng(0)
    y = (rng.random((200, 2)) < 0.5).astype(float)
    p = np.clip(y * 0.3 + rng.random((200, 2)) * 0.7, 0, 1)
    cam = rng.random((8, 2, 4, 4))
    ok = evaluate_gate(y, p, p + 1e-4, ["A", "B"], cam, cam * 1.01)
    assert ok.passed and ok.reason == "passed" and ok.cam_correlation == pytest.approx(1.0)
    worse = p.copy()
    worse[:, 1] = rng.random(200)  # finding B loses its discrimination
    bad = evaluate_gate(y, p, worse, ["A", "B"], cam, cam)
    assert not bad.passed and bad.auroc_finding == "B" and "auroc_delta" in bad.reason
    moved = evaluate_gate(y, p, p, ["A", "B"], cam, rng.random(cam.shape))
    assert not moved.passed and "cam_correlation" in moved.reason and "same_peak" in moved.reason
    assert evaluate_gate(y, p, p, ["A", "B"], None, None).reason == "failed:no_cam"
    broken = cam.copy()
    broken[0, 0, 0, 0] = np.nan  # a non-finite CAM: undefined fails, never passes
    undefined = evaluate_gate(y, p, p, ["A", "B"], cam, broken)
    assert not undefined.passed and undefined.cam_correlation is None
    json.loads(undefined.model_dump_json())  # no NaN in what the file and MLflow record


def test_a_local_int8_twin_runs_only_as_pinned_as_its_fp32_file(local_pair):
    from diagnostics.cli.serve import load_clinic_model
    from diagnostics.contract import file_sha256

    fp32_sha = file_sha256(local_pair)
    int8_sha = file_sha256(local_pair.with_name("model.int8.onnx"))

    def load(**pins):
        return load_clinic_model(
            str(local_pair), local_pair, None, device="cpu", threads=1, flags=VNNI, **pins
        )

    assert load().precision == "int8"  # neither pinned: the folder is trusted alike
    pinned = load(expected_sha256=fp32_sha)
    assert pinned.precision == "fp32" and "model.int8_sha256" in pinned.precision_reason
    assert load(expected_sha256=fp32_sha, expected_int8_sha256=int8_sha).precision == "int8"
    wrong = load(expected_sha256=fp32_sha, expected_int8_sha256="0" * 64)
    assert wrong.precision == "fp32" and "not the pinned" in wrong.precision_reason


def test_score_command_says_the_precision_it_ran(local_pair, tmp_path):
    """`diagnostics score --precision`: fp32 on request; int8 refused (exit 2) where it cannot
    run; each record names the precision."""
    from service_support import png_bytes, synth_pixels
    from typer.testing import CliRunner

    from diagnostics.cli import app

    image = tmp_path / "chest.png"
    image.write_bytes(png_bytes(synth_pixels(1, seed=5)[0]))
    out = tmp_path / "f.jsonl"
    args = ["score", str(image), "--model", str(local_pair), "--out", str(out)]
    r = CliRunner().invoke(app, [*args, "--precision", "fp32", "--no-heatmaps"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text().splitlines()[0])["precision"] == "fp32"
    local_pair.with_name("model.int8.onnx").unlink()
    r = CliRunner().invoke(app, [*args, "--precision", "int8"])
    assert r.exit_code == 2 and "int8" in r.output, r.output
