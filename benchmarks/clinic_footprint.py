"""Clinic footprint: install size, and the memory of a serving process by how it gets its model.

    .venv/bin/python benchmarks/clinic_footprint.py [--model M.onnx] [--studies 8]

Prints
- the size of the [clinic] venv (.venv-clinic, `make clinic-venv`) and of the full .venv (du);
- the peak RSS (VmHWM from /proc/<pid>/status) of `diagnostics serve` after it has scored
  `--studies` uploaded DICOMs, with the model given as
    a file path;
    models:/NAME@champion read with mlflow (the CLI before the REST client: this is what it
      did, reproduced by swapping its resolver back in the child process);
    models:/NAME@champion read over the tracking server's REST API (now);
  each from the full .venv, and the file path and REST runs again from .venv-clinic.

A real `mlflow server` (SQLite, proxied artefacts, in a temporary folder) holds the registry.
The default model is a random ResNet-18 at 224 px, exported as training exports (45 MB).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
CLINIC = ROOT / ".venv-clinic"
NAME = "cxr-footprint"

# The CLI as it was before the REST client: registry URIs resolved and followed with mlflow.
BEFORE = """
import sys
from pathlib import Path

import diagnostics.cli as cli


def resolve_with_mlflow(model, cache_dir=None):
    from diagnostics.train.evaluate import registry_version, resolve_model

    if not model.startswith("models:/"):
        return Path(model), None
    return resolve_model(model), registry_version(model)


cli.resolve_model_ref = resolve_with_mlflow
cli._registry_client = lambda cache_dir=None: None  # the alias is followed with mlflow too
sys.argv = ["diagnostics", *sys.argv[1:]]
cli.app()
"""

REGISTER = """
import sys
from pathlib import Path

import mlflow

from diagnostics.serve.registry_client import file_sha256
from diagnostics.train import tracking

url, name, onnx = sys.argv[1:4]
with mlflow.start_run(experiment_id=tracking.setup(url, "footprint", Path("unused"))):
    mlflow.set_tag("onnx_sha256", file_sha256(Path(onnx)))
    tracking.log_onnx_model(Path(onnx), None, name)
mlflow.MlflowClient().set_registered_model_alias(name, "champion", "1")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def du_mb(path: Path) -> float | None:
    if not path.is_dir():
        return None
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) / 1024


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) // 1024  # kB -> MB
    return fields


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start_registry(tmp: Path, model: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            str(VENV / "bin" / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp / "artifacts"),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("mlflow server did not start")
        time.sleep(0.5)
    subprocess.run(
        [str(VENV / "bin" / "python"), "-c", REGISTER, url, NAME, str(model)],
        check=True,
        capture_output=True,
        cwd=tmp,
    )
    return url, server


def studies(n: int) -> list[bytes]:
    from diagnostics.data.synthetic import SynthSpec, dicom_dataset, generate, to_stored

    out = []
    for k, (_, img, _) in enumerate(generate(n, SynthSpec(size=256), seed=5)):
        ds = dicom_dataset(
            to_stored(img.pixels, 12, "MONOCHROME2"),
            bits=12,
            photometric="MONOCHROME2",
            uid_seed=f"footprint-{k}",
        )
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def serve_peak(
    venv: Path, model: str, tracking: str, tmp: Path, payloads: list[bytes], before: bool
) -> dict[str, int]:
    """Start `diagnostics serve`, score the payloads through the API, read its memory."""
    port = free_port()
    data = Path(tempfile.mkdtemp(dir=tmp))
    config = data / "serve.yaml"
    config.write_text(
        json.dumps(
            {
                "port": port,
                "data_dir": str(data),
                "model": {"path": model, "device": "cpu", "refresh_s": 60},
                "limits": {"disk_reserve_mb": 0},
                "qc": {"ood": False},
                "worker": {"poll_s": 0.1},
            }
        )
    )
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
        "DIAGNOSTICS_HOME": str(data / "home"),
        "DIAGNOSTICS_TRACKING_URI": tracking,
    }
    cli = str(venv / "bin" / "diagnostics")
    key = subprocess.run(
        [cli, "keys", "create", "--role", "submitter", "--clinic", "c1", "-c", str(config)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.splitlines()[1]
    command = (
        [str(venv / "bin" / "python"), "-c", BEFORE, "serve", "-c", str(config)]
        if before
        else [cli, "serve", "-c", str(config)]
    )
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        cwd=data,
    )
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                httpx.get(f"{url}/health/ready", timeout=5)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not start: {' '.join(command[:3])}") from None
                time.sleep(0.3)
        ids = []
        for payload in payloads:
            r = httpx.post(
                f"{url}/v1/studies",
                files={"file": ("s.dcm", payload, "application/dicom")},
                headers=headers,
                timeout=60,
            )
            r.raise_for_status()
            ids.append(r.json()["id"])
        for study in ids:
            deadline = time.monotonic() + 120
            while httpx.get(f"{url}/v1/studies/{study}", headers=headers).json()["status"] not in (
                "scored",
                "failed_qc",
                "failed",
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"study {study} not scored")
                time.sleep(0.1)
        return proc_status(process.pid)
    finally:
        stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an exported CXR .onnx (default: ResNet-18)")
    parser.add_argument("--studies", type=int, default=8)
    args = parser.parse_args()

    clinic_mb, full_mb = du_mb(CLINIC), du_mb(VENV)
    print("install size (du)")
    print(
        f"  .venv-clinic  [clinic]  {clinic_mb or float('nan'):8.0f} MB"
        + ("" if clinic_mb else "   (absent: make clinic-venv)")
    )
    print(f"  .venv         [dev]     {full_mb or float('nan'):8.0f} MB")
    if clinic_mb and full_mb:
        print(f"  ratio full / clinic     {full_mb / clinic_mb:8.1f}x")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).parent))
            from diagnostics.train.export import random_export

            model = random_export("resnet18", 224, ["Pneumonia"], tmp / "resnet18.onnx")
        print(f"\nmodel {model.name}, {model.stat().st_size / 2**20:.0f} MB")
        url, server = start_registry(tmp, model)
        payloads = studies(args.studies)
        ref = f"models:/{NAME}@champion"
        runs = [
            ("file path", VENV, str(model), False),
            ("models:/ with mlflow (before)", VENV, ref, True),
            ("models:/ over REST (now)", VENV, ref, False),
        ]
        if CLINIC.is_dir():
            runs += [
                ("file path, .venv-clinic", CLINIC, str(model), False),
                ("models:/ over REST, .venv-clinic", CLINIC, ref, False),
            ]
        print(f"peak RSS of `diagnostics serve` after scoring {args.studies} DICOM uploads")
        results = {}
        try:
            for label, venv, path, before in runs:
                m = serve_peak(venv, path, url, tmp, payloads, before)
                results[label] = m["VmHWM"]
                print(f"  {label:<36} peak {m['VmHWM']:5d} MB   (now {m['VmRSS']:5d} MB)")
        finally:
            stop(server)
        base = results["file path"]
        print(
            f"models:/ peak / file-path peak: with mlflow "
            f"{results['models:/ with mlflow (before)'] / base:.2f}x, over REST "
            f"{results['models:/ over REST (now)'] / base:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
