"""The CLI as a user runs it: a subprocess of the installed `diagnostics` entry point."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, shared


def run(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diagnostics", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
    )


def test_help_lists_the_commands():
    out = run("--help")
    assert out.returncode == 0
    assert "data" in out.stdout and "demo" in out.stdout


def test_synth_then_check(tmp_path):
    out = run("data", "synth-cxr", str(tmp_path / "s"), "--n", "30", "--size", "48", "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "s" / "manifest.csv").is_file()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: manifest\n  labels_file: {tmp_path / 's' / 'manifest.csv'}\n")
    out = run("data", "check", "--config", str(cfg), "--set", "data.split.seed=3")
    assert out.returncode == 0, out.stderr
    assert "patient overlap between splits: none" in out.stdout
    assert "Pneumothorax" in out.stdout and "train" in out.stdout
    js = run("data", "check", "--config", str(cfg), "--json")
    summary = json.loads(js.stdout)
    assert summary["images"] == 30 and summary["patient_overlap"] == {}
    assert summary["splits"]["all"]["images"] == 30


def test_synth_dicom(tmp_path):
    out = run(
        "data",
        "synth-cxr",
        str(tmp_path),
        "--n",
        "2",
        "--size",
        "40",
        "--format",
        "dicom",
        "--bits",
        "16",
        "--photometric",
        "MONOCHROME1",
    )
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "images").glob("*.dcm"))) == 2


def test_bad_config_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  source: manifest\n  labels_file: x.csv\n  colour: blue\n")
    out = run("data", "check", "--config", str(cfg))
    assert out.returncode == 2 and "colour" in out.stderr and "Traceback" not in out.stderr
    out = run("data", "check", "--config", str(cfg), "--set", "root=/tmp")
    assert out.returncode == 2 and "use data.KEY" in out.stderr
    out = run("data", "check", "--config", str(cfg), "--set", "data.rooot=/tmp")
    assert "with --set overrides" in out.stderr and "data.rooot: unknown key 'rooot'" in out.stderr
    out = run("data", "check", "--config", str(tmp_path / "none.yaml"))
    assert out.returncode == 2 and "not found" in out.stderr
    out = run("data", "synth-cxr", str(tmp_path), "--format", "tiff")
    assert out.returncode == 2 and "png or dicom" in out.stderr
    cfg.write_text(
        "data:\n  source: folders\n  root: /tmp\n  patient_pattern: '(unclosed'\n"
        "  class_labels: {a: {pneumonai: 1}}\n  split: {fractions: {train: 0.5}}\n"
    )
    out = run("data", "check", "--config", str(cfg))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "data.patient_pattern: patient_pattern is not a valid regular expression" in out.stderr
    assert "unknown finding 'pneumonai'" in out.stderr
    assert "data.split.fractions: fractions must sum to 1" in out.stderr
    (tmp_path / "file").write_text("x")
    out = run("data", "synth-cxr", str(tmp_path / "file"), "--n", "1")
    assert out.returncode == 2 and "not a folder" in out.stderr


def test_overlap_is_reported_and_fails_the_check(tmp_path):
    # A manifest whose own split column puts patient p1 in both train and val.
    (tmp_path / "m.csv").write_text(
        "path,patient_id,split,Pneumonia\na.png,p1,train,1\nb.png,p1,val,0\nc.png,p2,val,0\n"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data:\n  source: manifest\n  labels_file: {tmp_path / 'm.csv'}\n"
        "  verify_images: false\n  split_column: split\n  split: {method: official}\n"
    )
    out = run("data", "check", "--config", str(cfg))
    assert out.returncode == 1
    assert "PATIENT OVERLAP: 1 patients in both train and val" in out.stdout
    assert "p1" not in out.stdout  # patient keys are counted, never printed
    # The same data split by patient has no overlap.
    out = run("data", "check", "--config", str(cfg), "--set", "data.split.method=patient")
    assert out.returncode == 0 and "overlap between splits: none" in out.stdout


@pytest.mark.parametrize(
    ("config", "expect"),
    [
        ("kermany.yaml", ["images kept: 5,216", "patients: 2,635"]),
        ("nih_sample.yaml", ["images kept: 60", "112,060 labelled images not on disk"]),
        ("nih14_labels_only.yaml", ["images kept: 112,120", "patients: 30,805", "NOT VERIFIED"]),
    ],
)
def test_shipped_configs_on_shared_data(config, expect):
    shared()
    out = run("data", "check", "--config", f"configs/cxr/{config}")
    assert out.returncode == 0, out.stderr
    for text in expect:
        assert text in out.stdout
    assert "patient overlap between splits: none" in out.stdout


def test_demo_runs_in_a_fresh_folder(tmp_path):
    # The demo needs only the repo's configs and writes under DIAGNOSTICS_HOME.
    import os

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    env = dict(os.environ, DIAGNOSTICS_HOME=str(tmp_path / "home"))
    out = run("demo", "--n", "40", "--size", "48", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "patient overlap between splits: none" in out.stdout
    assert (tmp_path / "home" / "demo" / "synth" / "manifest.csv").is_file()
    assert "blank.png: failed_qc [constant_image]" in out.stdout
    assert "child.dcm: failed_qc [outside_intended_population]" in out.stdout


def test_train_then_evaluate_from_the_command_line(tmp_path):
    import os

    env = dict(os.environ, DIAGNOSTICS_HOME=str(tmp_path / "home"))
    env.pop("MLFLOW_TRACKING_URI", None)
    out = run("data", "synth-cxr", str(tmp_path / "s"), "--n", "40", "--size", "32", env=env)
    assert out.returncode == 0, out.stderr
    manifest = tmp_path / "s" / "manifest.csv"
    sets = [
        f"data.labels_file={manifest}",
        "preprocess.size=32",
        "train.epochs=1",
        "train.max_steps_per_epoch=1",
        "model.options={width: 4, blocks: 2}",
        "eval.bootstrap=10",
        "eval.parity_images=2",
        "population.check=null",  # the demo's outside images are not written here
    ]
    args = ["train", "cxr", "--config", "configs/cxr/demo.yaml", "--no-mlflow"]
    for s in sets:
        args += ["--set", s]
    out = run(*args, env=env)
    assert out.returncode == 0, out.stderr
    assert "sha256" in out.stdout and "mean val AUROC" in out.stdout
    onnx_path = next((tmp_path / "home" / "runs").glob("demo-*/model.onnx"))
    metrics = tmp_path / "m.json"
    out = run(
        "evaluate",
        "--model",
        str(onnx_path),
        "--config",
        "configs/cxr/demo.yaml",
        "--set",
        f"data.labels_file={manifest}",
        "--split",
        "all",
        "--bootstrap",
        "0",
        "--out",
        str(metrics),
        env=env,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(metrics.read_text())
    assert result["dataset"]["images"] == 40 and set(result["findings"]) == {
        "Pneumonia",
        "Effusion",
        "Cardiomegaly",
        "Nodule",
        "Pneumothorax",
    }
    out = run(
        "evaluate",
        "--model",
        str(tmp_path / "none.onnx"),
        "--config",
        "configs/cxr/demo.yaml",
        env=env,
    )
    assert out.returncode == 2 and "not found" in out.stderr


def test_risk_train_score_and_evaluate_from_the_command_line(tmp_path):
    import os

    import pandas as pd

    env = dict(os.environ, DIAGNOSTICS_HOME=str(tmp_path / "home"))
    env.pop("MLFLOW_TRACKING_URI", None)
    cfg = "configs/risk/breast_cancer_demo.yaml"
    out = run(
        "train", "risk", "--config", cfg, "--set", "eval.bootstrap=10", "--no-mlflow", env=env
    )
    assert out.returncode == 0, out.stderr
    assert "ONNX parity" in out.stdout and "cv" in out.stdout
    model = next((tmp_path / "home" / "runs").glob("breast_cancer_demo-*/model.onnx"))
    records = tmp_path / "records.csv"
    from sklearn.datasets import load_breast_cancer

    df = load_breast_cancer(as_frame=True).frame.rename(columns=lambda c: c.replace(" ", "_"))
    df = df.head(3).drop(columns="target")
    df.loc[0, "worst_radius"] = -1
    df.to_csv(records, index=False)
    scores = tmp_path / "scores.csv"
    out = run("score-risk", str(records), "--model", str(model), "--out", str(scores), env=env)
    assert out.returncode == 0, out.stderr
    assert "2 of 3 records scored, 1 rejected" in out.stdout
    result = pd.read_csv(scores)
    assert result.loc[0, "status"] == "rejected" and "worst_radius" in result.loc[0, "reasons"]
    out = run("score-risk", str(records), "--model", str(tmp_path / "nope.onnx"), env=env)
    assert out.returncode == 2
    metrics = tmp_path / "m.json"
    out = run(
        "evaluate",
        "--model",
        str(model),
        "--config",
        cfg,
        "--bootstrap",
        "0",
        "--out",
        str(metrics),
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(metrics.read_text())["findings"]["malignant"]["auroc"] > 0.95
