"""The clinic install: a venv with only `pip install '.[clinic]'` (non-editable), as a clinic
makes it. `make test` builds it (`make clinic-venv`); without it these tests skip.

It must hold no training library, and its `diagnostics` must score a real DICOM, serve, and
say clearly what a training command needs.
"""

from __future__ import annotations

import filecmp
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, SHARED_DATA

CLINIC = REPO / ".venv-clinic"
BIN = CLINIC / "bin"
# Brought by [train] only. nvidia-* are torch's CUDA wheels.
FORBIDDEN = {
    "torch",
    "torchvision",
    "monai",
    "mlflow",
    "mlflow-skinny",
    "mlflow-tracing",
    "scikit-learn",
    "skl2onnx",
    "matplotlib",
}


@pytest.fixture(scope="module")
def clinic() -> Path:
    if not (BIN / "diagnostics").is_file():
        pytest.skip("no .venv-clinic: build it with `make clinic-venv` (`make test` does)")
    site = next((CLINIC / "lib").glob("python3*/site-packages/diagnostics"), None)
    if site is None:
        pytest.skip(".venv-clinic holds no installed diagnostics package: `make clinic-venv`")
    stale = [
        str(src.relative_to(REPO))
        for src in (REPO / "diagnostics").rglob("*.py")
        if "__pycache__" not in src.parts
        and not (
            (installed := site / src.relative_to(REPO / "diagnostics")).is_file()
            and filecmp.cmp(src, installed, shallow=False)
        )
    ]
    if stale:
        pytest.skip(f".venv-clinic is older than the source ({stale[0]}...): `make clinic-venv`")
    return BIN


def run(
    clinic: Path, *args: str, env: dict[str, str] | None = None, **kw
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [str(clinic / "diagnostics"), *args],
        capture_output=True,
        text=True,
        env={**full_env, **(env or {})},
        timeout=300,
        **kw,
    )


def test_the_clinic_install_holds_no_training_library(clinic):
    out = subprocess.run(
        [str(clinic / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower().replace("_", "-") for p in json.loads(out.stdout)}
    assert "diagnostics" in names and "onnxruntime" in names
    assert not names & FORBIDDEN, names & FORBIDDEN
    assert not [n for n in names if n.startswith("nvidia-")]
    # not an editable install: the package is a copy, so this tests the packaging (run outside
    # the project: `python -c` puts the working folder first on sys.path)
    code = "import diagnostics; print(diagnostics.__file__)"
    where = subprocess.run(
        [str(clinic / "python"), "-c", code], capture_output=True, text=True, cwd="/"
    )
    assert str(CLINIC) in where.stdout, where.stdout + where.stderr


def test_clinic_commands_run_and_training_commands_say_what_they_need(clinic, tmp_path):
    env = {"DIAGNOSTICS_HOME": str(tmp_path / "home")}
    for command in (
        ["--help"],
        ["serve", "--help"],
        ["worker", "--help"],
        ["score", "--help"],
        ["score-risk", "--help"],
        ["keys", "list", "--help"],
        ["users", "create", "--help"],
        ["report", "--help"],
        ["reviews", "export", "--help"],
        ["models", "pull", "--help"],
    ):
        out = run(clinic, *command, env=env)
        assert out.returncode == 0, (command, out.stderr)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    for command in (
        ["train", "cxr", "--config", str(REPO / "configs" / "cxr" / "demo.yaml")],
        ["evaluate", "-m", str(model), "-c", str(REPO / "configs" / "cxr" / "demo.yaml")],
        ["models", "list"],
        ["data", "synth-cxr", str(tmp_path / "synth"), "--n", "2"],
    ):
        out = run(clinic, *command, env=env, cwd=REPO)
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert "pip install 'diagnostics[train]'" in out.stderr, (command, out.stderr)
        assert "Traceback" not in out.stderr
    # A registry URI: a local store (SQLite) needs mlflow; a tracking server needs none, and
    # one that cannot be reached, with nothing cached, is named as such.
    image = tmp_path / "x.png"
    image.write_bytes(b"x")
    local = {**env, "DIAGNOSTICS_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = run(clinic, "score", str(image), "-m", "models:/cxr@champion", env=local)
    assert out.returncode == 2 and "is local and is read with mlflow" in out.stderr, out.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    remote = {**env, "DIAGNOSTICS_TRACKING_URI": dead}
    out = run(clinic, "models", "pull", "models:/cxr@champion", "--out", str(tmp_path), env=remote)
    assert out.returncode == 2, out.stderr
    assert "cannot be reached" in out.stderr and "no cached file" in out.stderr, out.stderr


def _score(clinic: Path, cxr_model: Path, inputs: list[Path], out: Path) -> list[dict]:
    result = run(clinic, "score", *map(str, inputs), "-m", str(cxr_model), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_score_a_png_with_the_clinic_install(clinic, cxr_model, tmp_path):
    from service_support import png_bytes, synth_pixels

    image = tmp_path / "chest.png"
    image.write_bytes(png_bytes(synth_pixels(1, seed=7)[0]))
    (record,) = _score(clinic, cxr_model, [image], tmp_path / "findings.jsonl")
    assert record["status"] == "scored", record
    assert record["provider"] == "CPUExecutionProvider" or "CPU" in record["provider"]
    assert {f["label"] for f in record["findings"]}


def test_score_real_dicom_with_the_clinic_install(clinic, cxr_model, tmp_path):
    """The real adult chest CR (MONOCHROME1, 1955x1841), uncompressed and as JPEG 2000: the
    clinic install decodes both (pylibjpeg-openjpeg), and they get the same outcome."""
    dicom = SHARED_DATA / "dicom"
    if not dicom.is_dir():
        pytest.skip("needs ../shared/data/dicom (real third-party DICOM files), absent here")
    files = [dicom / "pydicom-data_RG1_UNCR.dcm", dicom / "pydicom-data_RG1_J2KR.dcm"]
    records = _score(clinic, cxr_model, files, tmp_path / "findings.jsonl")
    for record in records:
        # read and decoded: a scored record or a QC refusal of the image, never a read failure
        assert record["status"] in ("scored", "failed_qc"), record
        assert record["image"]["format"] == "dicom"
        assert (record["image"]["rows"], record["image"]["cols"]) == (1955, 1841)
    a, b = records
    assert (a["status"], a["code"]) == (b["status"], b["code"])
    if a["status"] == "scored":
        for fa, fb in zip(a["findings"], b["findings"], strict=True):
            assert abs(fa["probability"] - fb["probability"]) < 1e-4  # lossless


def test_serve_with_the_clinic_install(clinic, cxr_model, tmp_path):
    """`keys create`, `serve` (with its worker and a risk model), an upload scored, `report`, a
    risk record scored from JSON and from FHIR: all without torch, mlflow or scikit-learn."""
    from risk_support import train_synthetic_dengue
    from service_support import dicom_bytes, synth_pixels

    risk_model = train_synthetic_dengue(tmp_path / "risk")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "serve.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "port": port,
                "data_dir": str(tmp_path / "serve"),
                "model": {"path": str(cxr_model), "device": "cpu", "refresh_s": 0},
                "limits": {"disk_reserve_mb": 0},
                "worker": {"poll_s": 0.1},
                "risk": {"models": {"dengue": {"path": str(risk_model)}}},
            }
        )
    )
    env = {"DIAGNOSTICS_HOME": str(tmp_path / "home")}
    out = run(
        clinic,
        "keys",
        "create",
        "--role",
        "submitter",
        "--clinic",
        "c1",
        "-c",
        str(config),
        env=env,
    )
    assert out.returncode == 0, out.stderr
    key = out.stdout.splitlines()[1].strip()
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        process = subprocess.Popen(
            [str(clinic / "diagnostics"), "serve", "-c", str(config)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ready = httpx.get(f"{url}/health/ready", timeout=5)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"serve did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "ok" and body["checks"]["model"]["ok"], body
        headers = {"Authorization": f"Bearer {key}"}
        data = dicom_bytes(synth_pixels(1, seed=9)[0])
        r = httpx.post(
            f"{url}/v1/studies",
            files={"file": ("x.dcm", data, "application/dicom")},
            headers=headers,
            timeout=60,
        )
        assert r.status_code == 202, r.text
        study = r.json()["id"]
        deadline = time.monotonic() + 60
        while (doc := httpx.get(f"{url}/v1/studies/{study}", headers=headers).json())[
            "status"
        ] not in ("scored", "failed_qc", "failed"):
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        assert doc["status"] == "scored", doc
        out = run(
            clinic, "report", study, "--format", "text", "--lang", "en", "-c", str(config), env=env
        )
        assert out.returncode == 0 and out.stdout.strip(), out.stderr
        assert body["checks"]["risk_models"]["dengue"]["label"] == "dengue"
        child = {"Age": 7, "WBC": 3.1, "PLT": 95, "DayDisease": 2, "Vomiting": 1}
        r = httpx.post(f"{url}/v1/risk/dengue", json=[child], headers=headers, timeout=30)
        assert r.status_code == 201 and r.json()["records"][0]["status"] == "scored", r.text
        r = httpx.post(
            f"{url}/v1/risk/dengue",
            json=[child],
            headers={**headers, "Accept": "application/fhir+json"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        assert r.json()["entry"][0]["resource"]["resourceType"] == "RiskAssessment"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_training_commands_without_training_libraries_say_what_to_install(tmp_path):
    """The same boundary without .venv-clinic: torch, mlflow and sklearn made unimportable."""
    import sys

    code = (
        "import sys\n"
        "for m in ('torch', 'mlflow', 'sklearn', 'scipy'): sys.modules[m] = None\n"
        "from diagnostics.cli import app\n"
        "app(sys.argv[1:])\n"
    )
    for command in (
        ["train", "cxr", "--config", "configs/cxr/demo.yaml"],
        ["models", "list"],
        ["data", "synth-cxr", str(tmp_path / "synth"), "--n", "2"],
    ):
        out = subprocess.run(
            [sys.executable, "-c", code, *command],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "DIAGNOSTICS_HOME": str(tmp_path / "home")},
        )
        assert out.returncode == 2, (command, out.stderr[-2000:])
        assert "pip install 'diagnostics[train]'" in out.stderr and "Traceback" not in out.stderr
