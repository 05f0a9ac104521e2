"""Train the tiny CNN for one batch on synthetic data, with a real MLflow store (SQLite in tmp)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diagnostics.contract import PreprocessSpec
from diagnostics.imaging import normalize
from diagnostics.train.config import CXRTrainConfig, load_train_config
from diagnostics.train.cxr import masked_bce, normalize_torch


def tiny_config(manifest, **train) -> CXRTrainConfig:
    return CXRTrainConfig.model_validate(
        {
            "name": "t",
            "data": {
                "source": "manifest",
                "labels_file": str(manifest),
                "split": {"fractions": {"train": 0.6, "val": 0.4}},
            },
            "model": {"name": "tiny_cnn", "options": {"width": 4, "blocks": 2}},
            "preprocess": {"size": 32},
            "train": {
                "epochs": 1,
                "batch_size": 8,
                "max_steps_per_epoch": 1,
                "threads": 2,
                **train,
            },
            "eval": {
                "bootstrap": 20,
                "parity_images": 4,
                "int8": True,
                "int8_calibration_images": 8,
            },
            "tracking": {"experiment": "test", "registered_model": "cxr-test"},
        }
    )


def test_masked_bce_ignores_nan_labels():
    logits = torch.zeros(2, 3, requires_grad=True)
    targets = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), float("nan"), 1.0]])
    loss = masked_bce(logits, targets)
    loss.backward()
    assert loss.item() == pytest.approx(np.log(2))  # every known term is log 2 at logit 0
    assert logits.grad[0, 1] == 0 and logits.grad[1, 0] == 0 and logits.grad[1, 1] == 0
    assert logits.grad[0, 0] != 0


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(size=8),
        PreprocessSpec(size=8, channels=3, normalize="imagenet"),
        PreprocessSpec(size=8, normalize="fixed", mean=(0.4,), std=(0.2,)),
    ],
)
def test_torch_normalisation_matches_imaging(spec):
    img = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    expected = normalize(img, spec)
    got = normalize_torch(torch.from_numpy(img)[:, None], spec).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_config_rejects_unknown_keys_and_bad_policy(tmp_path):
    from diagnostics.configio import ConfigError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {source: manifest, labels_file: x.csv}\ntrain: {epochz: 3}\n")
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown key"):
        load_train_config(cfg)
    with pytest.raises(ConfigError, match="threshold_policy"):
        load_train_config(tmp_path / "c.yaml", ["train=null", "eval.threshold_policy=f1"])


def test_shipped_configs_validate():
    from tests.conftest import REPO

    for path in sorted((REPO / "configs" / "cxr").glob("*.yaml")):
        text = path.read_text()
        if "model:" in text:
            load_train_config(path)


def test_train_track_export_evaluate_resume(home, synth_png, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    import diagnostics.train.cxr as C
    from diagnostics.data.config import parse_dataset_config
    from diagnostics.serve.runner import OnnxModel, file_sha256
    from diagnostics.train.cxr import train_cxr
    from diagnostics.train.evaluate import evaluate

    cfg = tiny_config(synth_png, epochs=2)
    # The machine dies during epoch 2's validation: the run is FAILED, epoch 1 is checkpointed.
    real, calls = C.predict_logits, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "predict_logits", dying)
    with pytest.raises(RuntimeError, match="power cut"):
        train_cxr(cfg, progress=False)
    monkeypatch.setattr(C, "predict_logits", real)
    (run_dir,) = (home / "runs").iterdir()
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'var' / 'mlflow.db'}")
    (failed,) = client.search_runs(client.get_experiment_by_name("test").experiment_id)
    assert failed.info.status == "FAILED"

    # Resume: epoch 2 only, on the same MLflow run, then calibrate, export, register.
    result = train_cxr(cfg, resume=run_dir, progress=False)
    assert result.run_id == failed.info.run_id and result.epochs_run == 2
    assert [h["epoch"] for h in result.history] == [1, 2]

    # Export: parity, metadata, identity.
    assert result.parity <= 1e-4
    runner = OnnxModel(result.onnx_path)
    assert runner.metadata.labels == result.findings
    assert runner.metadata.run_id == result.run_id
    assert runner.sha256 == result.sha256 == file_sha256(result.onnx_path)
    assert set(runner.output_names) == {"logits", "cam", "embedding"}
    assert runner.metadata.ood is not None and runner.metadata.ood.threshold > 0
    # The optional int8 file: same metadata, says it is quantised, checked against fp32.
    q8 = OnnxModel(result.int8["path"])
    assert q8.metadata.quantization == "int8-static-qdq-per-channel"
    assert q8.metadata.labels == result.findings and q8.sha256 == result.int8["sha256"]
    assert 0 <= result.int8["max_prob_diff"] < 1
    batch = np.zeros((3, 1, 32, 32), np.float32)  # dynamic batch
    pred = runner.predict(batch, cam=True)
    assert pred.probabilities.shape == (3, 5) and pred.cam.shape[:2] == (3, 5)

    # Tracking: a real SQLite store under the home folder, artefacts and a registered version.
    assert (home / "var" / "mlflow.db").is_file()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "val.mean_auroc" in run.data.metrics and "train_loss" in run.data.metrics
    assert run.data.params["model.name"] == "tiny_cnn"
    assert run.data.tags["onnx_sha256"] == result.sha256
    assert {"git_commit", "package_version", "device"} <= set(run.data.tags)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "metrics.json", "model_card.md", "plots", "int8"} <= artifacts
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest
    version = client.get_model_version("cxr-test", result.model_version)
    assert version.run_id == result.run_id
    # The registered file is the exported file, byte for byte.
    mlflow.set_tracking_uri(f"sqlite:///{home / 'var' / 'mlflow.db'}")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/cxr-test/{result.model_version}"
    )
    from pathlib import Path

    registered = sorted(Path(local).rglob("*.onnx"))
    assert registered and file_sha256(registered[0]) == result.sha256
    # The clinic side gets the registered file and its version, and reads the ONNX directly.
    from diagnostics.cli import resolve_model_ref

    for uri in (f"models:/cxr-test/{result.model_version}", "models:/cxr-test/latest"):
        path, version = resolve_model_ref(uri)
        runner = OnnxModel(path, version=version)
        assert runner.sha256 == result.sha256 and version == str(result.model_version)
        assert runner.describe()["version"] == version

    # Privacy: no patient keys or file paths in params, the card or the metrics.
    logged = json.dumps(run.data.params) + (result.run_dir / "model_card.md").read_text()
    assert "SYN003-" not in logged and "images/0000" not in logged

    # Evaluate the exported file with ONNX Runtime: same validation AUROC as in training.
    report = evaluate(
        result.onnx_path,
        parse_dataset_config(cfg.data.model_dump(mode="json")),
        split="val",
        n_boot=0,
        progress=False,
    )
    for f in result.findings:
        a, b = report["findings"][f]["auroc"], result.val[f]["auroc"]
        assert (np.isnan(a) and np.isnan(b)) or abs(a - b) <= 0.005, (f, a, b)

    assert len(client.search_model_versions("name='cxr-test'")) == 1
    # A finished run is not resumed again (it would register a duplicate version) ...
    with pytest.raises(ValueError, match="has finished"):
        train_cxr(tiny_config(synth_png, epochs=3), resume=run_dir, progress=False)
    # ... and a resume with other data or another network is refused.
    other = tiny_config(synth_png, epochs=3)
    other.model.options = {"width": 8, "blocks": 2}
    with pytest.raises(ValueError, match="'model' config differs"):
        train_cxr(other, resume=run_dir, progress=False)


def test_training_needs_train_and_val(home, synth_png):
    from diagnostics.data.cxr import DatasetError
    from diagnostics.train.cxr import train_cxr

    cfg = tiny_config(synth_png)
    cfg.data.split.fractions = {"train": 1.0}
    with pytest.raises(DatasetError, match="'val' split"):
        train_cxr(cfg, progress=False, log_to_mlflow=False)


def test_device_selection_falls_back_to_cpu():
    from diagnostics.train.cxr import autocast_dtype, cpu_has_bf16, select_device

    if not torch.cuda.is_available():
        assert select_device("cuda").type == "cpu"  # asked for CUDA, none here: CPU, with a warning
        assert select_device("auto").type == "cpu"
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, False) is None
    assert autocast_dtype(cpu, True) == (torch.bfloat16 if cpu_has_bf16() else None)
    assert autocast_dtype(torch.device("cuda"), True) == torch.float16


def test_resume_last_picks_this_config_only(home):
    from diagnostics.train.cxr import _run_dir

    runs = home / "runs"
    for name in ("t-20260101-000000", "t-other-20990101-000000", "t-20260102-000000"):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "checkpoints" / "last.pt").write_bytes(b"x")
    cfg = CXRTrainConfig.model_validate(
        {"name": "t", "data": {"source": "manifest", "labels_file": "x.csv"}}
    )
    assert _run_dir(cfg, "last").name == "t-20260102-000000"
