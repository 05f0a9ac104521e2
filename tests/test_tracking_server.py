"""`diagnostics tracking serve`: MLflow's server on PostgreSQL with proxied artefacts, and the
reviewers' whole path through it.

One server per module, started as users start it, on a free loopback port against a fresh
database in the local PostgreSQL (dropped afterwards; the tests skip when PostgreSQL cannot be
reached). Trainers and reviewers only know MLFLOW_TRACKING_URI=http://...: `train cxr`,
`train risk`, `models list|compare|promote|rollback|recalibrate` and the reviewers' notebook
run against it, and every artefact goes through the server's proxy. The database URI carries a
password, which must never show: not in any output, log or process command line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, tiny_cxr_config
from tracking_support import PASSWORD, TrackingServer, fresh_database, tracking_server
from typer.testing import CliRunner

from diagnostics.cli import app

CXR, RISK = "cxr-srv", "risk-srv"
PROXIED = "mlflow-artifacts:/"


# --------------------------------------------------------------------------- without a server


def test_redact_hides_passwords_in_uris():
    from diagnostics.cli.tracking import database_uri, scrub
    from diagnostics.settings import redact_uri as redact
    from diagnostics.settings import uri_secrets as secrets

    uri = "postgresql+psycopg://mlflow:p%40ss:w@db.local:5432/mlflow?password=two&sslmode=require"
    assert redact(uri) == (
        "postgresql+psycopg://mlflow:***@db.local:5432/mlflow?password=***&sslmode=require"
    )
    hidden = secrets(uri)
    assert {"p%40ss:w", "p@ss:w", "two"} <= set(hidden)
    assert scrub(f"failed: {uri} (p@ss:w)", hidden).count("***") == 3
    assert redact("postgresql://mlflow@db/mlflow") == "postgresql://mlflow@db/mlflow"
    assert secrets("sqlite:////tmp/mlflow.db") == []
    assert database_uri("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert database_uri("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"


def test_clients_are_warned_when_artefacts_would_bypass_the_server(caplog):
    from diagnostics.train.tracking import _check_artifact_location

    with caplog.at_level(logging.WARNING, "diagnostics.train.tracking"):
        _check_artifact_location("http://mlflow:5000", "cxr", "mlflow-artifacts:/3")
        _check_artifact_location("http://mlflow:5000", "cxr", "s3://bucket/mlflow/3")
        _check_artifact_location("sqlite:////x/mlflow.db", "cxr", "file:///x/mlartifacts/cxr")
        assert not caplog.records
        _check_artifact_location("http://mlflow:5000", "cxr", "file:///x/mlartifacts/cxr")
    assert "a local path" in caplog.text and "'cxr'" in caplog.text


def test_serve_needs_a_reachable_database(tmp_path, monkeypatch):
    from diagnostics.settings import get_settings

    monkeypatch.setenv("DIAGNOSTICS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DIAGNOSTICS_TRACKING_DB", raising=False)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        r = runner.invoke(app, ["tracking", "serve"])
        assert r.exit_code == 2 and "DIAGNOSTICS_TRACKING_DB" in r.output, r.output
        # nothing listens on port 1: a clear error, the password redacted
        monkeypatch.setenv("DIAGNOSTICS_TRACKING_DB", "postgresql://ops:Secr3t@127.0.0.1:1/x")
        get_settings.cache_clear()
        r = runner.invoke(app, ["tracking", "serve"])
        assert r.exit_code == 2, r.output
        assert "cannot reach the tracking database" in r.output
        assert "postgresql+psycopg://ops:***@127.0.0.1:1/x" in r.output
        assert "Secr3t" not in r.output
        # a password on the command line is refused: ps and shell history would show it
        r = runner.invoke(app, ["tracking", "serve", "--db", "postgresql://ops:Secr3t@h/x"])
        assert r.exit_code == 2 and "~/.pgpass" in r.output and "Secr3t" not in r.output
    finally:
        get_settings.cache_clear()


def test_allowed_hosts_cover_the_address_printed_for_clients():
    import socket

    from mlflow.server.security_utils import is_allowed_host_header

    from diagnostics.cli.tracking import allowed_host_patterns, client_uri

    assert allowed_host_patterns("127.0.0.1", None) is None  # MLflow's own defaults
    assert allowed_host_patterns("0.0.0.0", "mlflow.hospital.vn,10.0.0.5:5000").split(",") == [
        "mlflow.hospital.vn",
        "10.0.0.5:5000",
        "mlflow.hospital.vn:*",
    ]
    patterns = allowed_host_patterns("0.0.0.0", None).split(",")
    printed = client_uri("0.0.0.0", 5000).removeprefix("http://")  # fqdn:5000
    for host in (printed, socket.getfqdn(), "localhost:5000", "10.1.2.3:5000"):
        assert is_allowed_host_header(patterns, host), host


def test_serve_check_prints_the_command_with_the_password_redacted(tmp_path, monkeypatch):
    from diagnostics.settings import get_settings

    with fresh_database() as db:
        monkeypatch.setenv("DIAGNOSTICS_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("DIAGNOSTICS_TRACKING_DB", db)
        get_settings.cache_clear()
        try:
            r = CliRunner().invoke(app, ["tracking", "serve", "--check", "--port", "5999"])
        finally:
            get_settings.cache_clear()
    assert r.exit_code == 0, r.output
    shown = db.replace(PASSWORD, "***")
    assert f"mlflow server --backend-store-uri {shown} --artifacts-destination " in r.output
    assert "--serve-artifacts --host 127.0.0.1 --port 5999 --workers 2" in r.output
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5999" in r.output
    assert (tmp_path / "home" / "var" / "tracking-artifacts").is_dir()  # the default place
    assert PASSWORD not in r.output


# --------------------------------------------------------------------------- through a server


class Reviewer:
    """Runs the CLI in this process as a trainer or reviewer would, with only the server's URL;
    keeps every output for the password check."""

    def __init__(self, server: TrackingServer, root: Path, manifest: Path) -> None:
        self.server, self.root, self.home, self.manifest = server, root, root / "home", manifest
        self.data = {  # the evaluation data: the same synthetic images, split as in training
            "source": "manifest",
            "labels_file": str(manifest),
            "split": {"fractions": {"train": 0.6, "val": 0.4}},
        }
        self.eval_cfg = root / "eval.yaml"
        self.eval_cfg.write_text(yaml.safe_dump({"data": self.data}))
        self.outputs: list[str] = []
        self.runner = CliRunner()

    def __call__(self, *args: str) -> str:
        r = self.runner.invoke(app, list(args))
        self.outputs.append(r.output)
        assert r.exit_code == 0, f"{' '.join(args)} -> {r.exit_code}:\n{r.output}{r.exception}"
        return r.stdout

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.server.url)


@pytest.fixture(scope="module")
def reviewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reviewer]:
    """The server, and a reviewer's environment pointing at it (MLFLOW_TRACKING_URI only)."""
    from diagnostics.data.synthetic import write_dataset
    from diagnostics.settings import get_settings

    root = tmp_path_factory.mktemp("tracking_server")
    with (
        fresh_database() as db,
        tracking_server(db, root / "server", wait=False) as server,
        pytest.MonkeyPatch.context() as mp,
    ):
        manifest = write_dataset(root / "data", 120, size=64, seed=31)  # while it starts
        for key in ("DIAGNOSTICS_TRACKING_URI", "DIAGNOSTICS_TRACKING_DB"):
            mp.delenv(key, raising=False)
        mp.setenv("DIAGNOSTICS_HOME", str(root / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", server.url)
        get_settings.cache_clear()
        server.wait_ready()
        try:
            yield Reviewer(server, root, manifest)
        finally:
            get_settings.cache_clear()


def _train_cxr(r: Reviewer, name: str, steps: int, *extra: str) -> str:
    cfg = tiny_cxr_config(
        r.manifest,
        name=name,
        size=64,
        width=4,
        blocks=2,
        train={"epochs": 2, "batch_size": 16, "max_steps_per_epoch": steps, "lr": 0.003},
        tracking={"experiment": "srv", "registered_model": CXR},
    )
    path = r.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return r("train", "cxr", "--config", str(path), *extra)


@pytest.mark.slow
def test_training_logs_through_the_proxy(reviewer: Reviewer):
    r = reviewer
    out = _train_cxr(r, "weak", 1)
    assert "registered version 1" in out and f"open the MLflow UI of {r.server.url}" in out
    # two processes (torchrun, DDP on gloo) train one model: one run, one version, via the
    # server (rank 0 prints to the workers' own stdout, not to this runner: checked below)
    _train_cxr(r, "longer", 4, "--nproc", "2")
    out = r(
        "train",
        "risk",
        "--config",
        str(REPO / "configs" / "risk" / "breast_cancer_demo.yaml"),
        *("--set", "eval.bootstrap=10", "--set", f"tracking.registered_model={RISK}"),
    )
    assert "ONNX parity" in out

    from diagnostics.serve.registry_client import file_sha256

    client = r.client()
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments() if e.name != "Default"]
    )
    assert len(runs) == 3  # weak, longer (2 processes, rank 0 alone tracks), the risk model
    assert [len(client.search_model_versions(f"name='{n}'")) for n in (CXR, RISK)] == [2, 1]
    for run in runs:
        assert run.info.artifact_uri.startswith(PROXIED), run.info.artifact_uri
    stored = {file_sha256(p): p for p in r.server.artifacts.rglob("*.onnx")}
    for name, version in ((CXR, "1"), (CXR, "2"), (RISK, "1")):
        assert client.get_model_version_download_uri(name, version).startswith(PROXIED)
        sha = client.get_model_version(name, version).tags["onnx_sha256"]
        assert sha in stored  # the file the server keeps, under its --artifacts destination
    # nothing went to a local store on the trainer's side
    assert not (r.home / "var" / "mlflow.db").exists()
    assert not (r.home / "var" / "mlartifacts").exists()


@pytest.mark.slow
def test_models_list_compare_promote_rollback(reviewer: Reviewer):
    r = reviewer
    out = r("models", "list")
    assert CXR in out and RISK in out
    cmp_dir = r.root / "cmp"
    out = r(
        "models",
        "compare",
        f"models:/{CXR}/2",
        f"models:/{CXR}/1",
        *("-c", str(r.eval_cfg), "--bootstrap", "20", "--out", str(cmp_dir)),
    )
    evidence = json.loads((cmp_dir / "compare.json").read_text())["evidence_run"]
    assert evidence and f"MLflow run {evidence}" in out
    client = r.client()
    assert client.get_run(evidence).info.artifact_uri.startswith(PROXIED)
    assert list(r.server.artifacts.rglob(f"{evidence}/artifacts/compare.md"))

    loose, ok = r.root / "loose.yaml", r.root / "ok.yaml"
    loose.write_text(yaml.safe_dump({"data": r.data, "bootstrap": 20}))
    ok.write_text(
        yaml.safe_dump({"data": r.data, "bootstrap": 20, "auroc_margin": 1.0, "max_ece": 1.0})
    )
    out = r(
        "models", "promote", f"models:/{CXR}/1", "--gate", str(loose), "--out", str(r.root / "p1")
    )
    assert "is now @champion" in out
    out = r("models", "promote", f"models:/{CXR}/2", "--gate", str(ok), "--out", str(r.root / "p2"))
    assert "is now @champion (was 1)" in out
    assert str(client.get_model_version_by_alias(CXR, "champion").version) == "2"
    assert "2 -> 1" in r("models", "rollback", CXR)
    assert str(client.get_model_version_by_alias(CXR, "champion").version) == "1"
    history = json.loads(client.get_registered_model(CXR).tags["alias_history"])
    assert [h["action"] for h in history] == ["promote", "promote", "rollback"]
    out = r("models", "list")
    assert "champion" in out


@pytest.mark.slow
def test_recalibrate_the_champion_from_the_registry(reviewer: Reviewer):
    """The champion is resolved over the server's REST API (as at a clinic) and cached."""
    from service_support import serve_config

    r = reviewer
    cfg = serve_config(f"models:/{CXR}@champion", r.root / "serve", qc={"ood": False})
    serve_yaml = r.root / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = r(
        "models",
        "recalibrate",
        f"models:/{CXR}@champion",
        *("-c", str(r.eval_cfg), "--site", "clinic-a", "--min-cases", "3"),
        *("--serve-config", str(serve_yaml)),
    )
    assert "site profile" in out
    sha = r.client().get_model_version(CXR, "1").tags["onnx_sha256"]
    assert sha[:12] in out  # the profile is for the champion's file (version 1, after rollback)
    assert (r.home / "model-cache" / "sha256" / f"{sha}.onnx").is_file()


@pytest.mark.slow
def test_reviewer_notebook_against_the_server(reviewer: Reviewer):
    """notebooks/compare_runs.ipynb, executed (nbclient) with MLFLOW_TRACKING_URI=the server."""
    import nbformat
    from nbclient import NotebookClient

    r = reviewer
    nb = nbformat.read(REPO / "notebooks" / "compare_runs.ipynb", as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NB_MODEL", CXR)
        mp.setenv("NB_VERSIONS", "1,2")
        mp.setenv("NB_DATA_CONFIG", str(r.eval_cfg))
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
        ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps([o.get("data", {}) for o in outputs])
    r.outputs.append(text)
    assert "image/png" in text  # the ROC and calibration figure
    assert "Compare:" in text  # the latest compare report, downloaded through the proxy
    assert "weak" in text and "longer" in text  # the runs table, from the server


@pytest.mark.slow
def test_no_password_in_any_output_log_or_command_line(reviewer: Reviewer):
    """Last: the server's own log, every command's output, every process of the server."""
    r = reviewer
    log = r.server.output()
    assert "postgresql+psycopg://postgres:***@127.0.0.1:5432/" in log  # the command it ran
    assert "Uvicorn running" in log  # mlflow's own output comes through
    assert PASSWORD not in log
    assert r.outputs and not [o for o in r.outputs if PASSWORD in o]
    group = r.server.process.pid
    seen = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != group:
                continue
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
        seen += 1
        assert PASSWORD not in cmdline, cmdline
    assert seen >= 3  # diagnostics, mlflow, uvicorn
