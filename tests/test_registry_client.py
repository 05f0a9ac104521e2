"""The clinic follows the registry over a real MLflow tracking server's REST API, without mlflow.

The same checks run against two servers, each started per module as users start it
(`diagnostics tracking serve`, proxied artefacts in tmp) on a free port: one on SQLite, one on
the local PostgreSQL (a fresh database, dropped afterwards; skipped when PostgreSQL is not
reachable). Models are registered by `tracking.log_onnx_model`, as training does. Slow: each
server takes some seconds to create its tables (SQLite about 25 s, PostgreSQL about 8 s).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tracking_support import TrackingServer, fresh_database, tracking_server

pytestmark = pytest.mark.slow

HEAVY = ("torch", "torchvision", "monai", "mlflow", "sklearn", "diagnostics.train")
NAME = "cxr-clinic"


@dataclass
class Registry:
    url: str
    server: TrackingServer
    sha: dict[str, str]  # version -> sha256 of its file
    files: dict[str, Path]

    def post(self, route: str, body: dict) -> None:
        r = httpx.post(f"{self.url}/api/2.0/mlflow/{route}", json=body, timeout=30)
        assert r.status_code == 200, r.text

    def delete(self, route: str, body: dict) -> None:
        r = httpx.request("DELETE", f"{self.url}/api/2.0/mlflow/{route}", json=body, timeout=30)
        assert r.status_code == 200, r.text

    def set_alias(self, alias: str, version: str) -> None:
        self.post("registered-models/alias", {"name": NAME, "alias": alias, "version": version})

    def stop(self) -> None:
        self.server.stop()


REGISTER = """
import sys
from pathlib import Path

import mlflow

from diagnostics.train import tracking
from diagnostics.serve.registry_client import file_sha256

url, name = sys.argv[1], sys.argv[2]
experiment = tracking.setup(url, "clinic", Path("unused"))
for onnx in sys.argv[3:]:
    with mlflow.start_run(experiment_id=experiment):
        mlflow.set_tag("onnx_sha256", file_sha256(Path(onnx)))  # as train_cxr does
        print("version", tracking.log_onnx_model(Path(onnx), None, name)[1])
"""


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    import onnx

    from diagnostics.serve.registry_client import file_sha256

    root = tmp_path_factory.mktemp(f"mlflow_{request.param}")
    with ExitStack() as stack:
        db = (
            f"sqlite:///{root / 'mlflow.db'}"
            if request.param == "sqlite"
            else stack.enter_context(fresh_database())
        )
        server = stack.enter_context(tracking_server(db, root / "server", wait=False))
        # the server creates its tables meanwhile
        cxr_model = request.getfixturevalue("cxr_model")
        # version 2: the same network, another file (its doc string differs)
        proto = onnx.load(str(cxr_model))
        proto.doc_string = "version 2"
        second = root / "second.onnx"
        onnx.save(proto, str(second))
        server.wait_ready()
        out = subprocess.run(
            [sys.executable, "-c", REGISTER, server.url, NAME, str(cxr_model), str(second)],
            capture_output=True,
            text=True,
            cwd=root,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        versions = [
            line.split()[1] for line in out.stdout.splitlines() if line.startswith("version ")
        ]
        assert versions == ["1", "2"], out.stdout
        reg = Registry(server.url, server, {}, {"1": cxr_model, "2": second})
        reg.sha = {"1": file_sha256(cxr_model), "2": file_sha256(second)}
        assert reg.sha["1"] != reg.sha["2"]
        # the files went through the server's proxy, under its --artifacts destination
        stored = {file_sha256(f) for f in server.artifacts.rglob("*.onnx")}
        assert set(reg.sha.values()) <= stored
        reg.set_alias("champion", "1")
        yield reg


class CountingTransport(httpx.HTTPTransport):
    """Counts the artefact downloads a client makes."""

    def __init__(self) -> None:
        super().__init__()
        self.downloads = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(".onnx"):
            self.downloads += 1
        return super().handle_request(request)


def test_resolve_by_alias_version_and_latest_with_a_sha256_cache(registry, tmp_path, caplog):
    from diagnostics.serve.registry_client import (
        RegistryClient,
        RegistryError,
        RegistryIntegrityError,
        file_sha256,
    )
    from diagnostics.serve.runner import OnnxModel

    transport = CountingTransport()
    cache = tmp_path / "cache"
    with RegistryClient(registry.url, cache, transport=transport) as client:
        champion = client.resolve(f"models:/{NAME}@champion")
        assert (champion.version, champion.sha256) == ("1", registry.sha["1"])
        assert champion.path == cache / "sha256" / f"{registry.sha['1']}.onnx"
        assert file_sha256(champion.path) == registry.sha["1"] and not champion.offline
        assert OnnxModel(champion.path, version=champion.version).metadata.task == "cxr"
        pinned = client.resolve(f"models:/{NAME}/2")
        assert (pinned.version, file_sha256(pinned.path)) == ("2", registry.sha["2"])
        assert client.resolve(f"models:/{NAME}/latest").version == "2"
        assert transport.downloads == 2  # one per file; `latest` is version 2, cached
        # the same refs again: the registry is asked, the files are not downloaded again
        assert client.resolve(f"models:/{NAME}@champion").path == champion.path
        assert client.resolve(f"models:/{NAME}/1").path == champion.path
        assert transport.downloads == 2
        refs = json.loads((cache / "refs.json").read_text())
        assert refs[f"models:/{NAME}@champion"]["sha256"] == registry.sha["1"]
        assert refs[f"models:/{NAME}/2"]["version"] == "2"

        # Unknown names, aliases and versions: the server's reason, no download.
        for ref, words in (
            (f"models:/{NAME}@nope", "nope"),
            (f"models:/{NAME}/9", "not found"),
            ("models:/no-such-model/latest", "no registered model"),
        ):
            with pytest.raises(RegistryError, match=words):
                client.resolve(ref)
        with pytest.raises(ValueError, match="stages are deprecated"):
            client.resolve(f"models:/{NAME}/Production")

    # The sha256 recorded at registration is checked: training tags the version, and the run.
    mv = httpx.get(
        f"{registry.url}/api/2.0/mlflow/model-versions/get",
        params={"name": NAME, "version": "2"},
    ).json()["model_version"]
    assert {t["key"]: t["value"] for t in mv["tags"]}["onnx_sha256"] == registry.sha["2"]
    version_tag = {"name": NAME, "version": "2", "key": "onnx_sha256"}
    registry.post("model-versions/set-tag", {**version_tag, "value": "0" * 64})
    with RegistryClient(registry.url, tmp_path / "fresh") as client:
        with pytest.raises(RegistryIntegrityError, match="training recorded 000000000000"):
            client.resolve(f"models:/{NAME}/2")
        assert not list((tmp_path / "fresh" / "sha256").iterdir())  # nothing kept
        # without the version's tag, the run's onnx_sha256 tag is the reference
        registry.delete("model-versions/delete-tag", version_tag)
        assert file_sha256(client.resolve(f"models:/{NAME}/2").path) == registry.sha["2"]
    registry.post("model-versions/set-tag", {**version_tag, "value": registry.sha["2"]})

    # A corrupted cache file is noticed, removed and downloaded again.
    transport = CountingTransport()
    champion.path.write_bytes(b"not the model")
    with (
        caplog.at_level(logging.WARNING, "diagnostics.serve.registry_client"),
        RegistryClient(registry.url, cache, transport=transport) as client,
    ):
        again = client.resolve(f"models:/{NAME}@champion")
    assert file_sha256(again.path) == registry.sha["1"] and transport.downloads == 1
    assert "corrupted" in caplog.text


def test_follow_an_alias(registry, tmp_path):
    from diagnostics.serve.registry_client import RegistryClient

    with RegistryClient(registry.url, tmp_path / "cache") as client:
        source = client.follow(f"models:/{NAME}@staging")
        registry.set_alias("staging", "1")
        path, version = source(None)
        assert version == "1" and path.name == f"{registry.sha['1']}.onnx"
        assert source("1") is None  # unchanged
        registry.set_alias("staging", "2")
        path, version = source("1")
        assert version == "2" and path.name == f"{registry.sha['2']}.onnx"


def test_the_service_swaps_models_when_the_alias_moves(registry, tmp_path, monkeypatch):
    """A running service follows models:/NAME@canary over REST and scores with the new version
    once the alias moves, without a restart."""
    import time

    from service_support import dicom_bytes, running_service, serve_config, synth_pixels

    from diagnostics.cli import _model_source
    from diagnostics.settings import get_settings

    monkeypatch.setenv("DIAGNOSTICS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DIAGNOSTICS_TRACKING_URI", registry.url)
    get_settings.cache_clear()
    ref = f"models:/{NAME}@canary"
    registry.set_alias("canary", "1")
    cfg = serve_config(ref, tmp_path / "serve", model={"refresh_s": 0.2}, qc={"ood": False})
    try:
        with running_service(cfg, _model_source(cfg)) as svc:
            holder = svc.app.state.holder
            assert (holder.model.version, holder.model.sha256) == ("1", registry.sha["1"])
            registry.set_alias("canary", "2")
            deadline = time.monotonic() + 30
            while holder.model.version != "2" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (holder.model.version, holder.model.sha256) == ("2", registry.sha["2"])
            r = svc.upload(dicom_bytes(synth_pixels(1, seed=9)[0]))
            assert r.status_code == 202, r.text
            finding = svc.wait(r.json()["id"])["findings"][0]
            assert (finding["model_version"], finding["model_sha256"]) == ("2", registry.sha["2"])
    finally:
        get_settings.cache_clear()


def _run(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, **env}, timeout=300, **kw
    )


def test_cli_resolves_without_training_libraries(registry, tmp_path):
    """`score` and `models pull` on a models:/ URI; resolving loads no mlflow, torch, sklearn."""
    from service_support import png_bytes, synth_pixels

    env = {"DIAGNOSTICS_HOME": str(tmp_path / "home"), "DIAGNOSTICS_TRACKING_URI": registry.url}
    env.pop("MLFLOW_TRACKING_URI", None)
    code = (
        "import sys; from diagnostics.cli import resolve_model_ref; "
        f"print(resolve_model_ref('models:/{NAME}@champion')); "
        "from diagnostics.serve.runner import OnnxModel; "
        f"OnnxModel(resolve_model_ref('models:/{NAME}/2')[0]); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = _run([sys.executable, "-c", code], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]", out.stdout
    assert "'1')" in out.stdout.splitlines()[0]

    diagnostics = str(Path(sys.executable).with_name("diagnostics"))
    image = tmp_path / "chest.png"
    image.write_bytes(png_bytes(synth_pixels(1, seed=7)[0]))
    findings = tmp_path / "findings.jsonl"
    out = _run(
        [
            diagnostics,
            "score",
            str(image),
            "-m",
            f"models:/{NAME}@champion",
            "--out",
            str(findings),
        ],
        env,
    )
    assert out.returncode == 0, out.stderr
    record = json.loads(findings.read_text().splitlines()[0])
    assert record["status"] == "scored"
    assert (record["model_sha256"], record["model_version"]) == (registry.sha["1"], "1")

    out = _run(
        [diagnostics, "models", "pull", f"models:/{NAME}@champion", "--out", str(tmp_path / "p")],
        env,
    )
    assert out.returncode == 0, out.stderr
    pulled = tmp_path / "p" / f"{NAME}-v1.onnx"
    sha_line = (tmp_path / "p" / f"{NAME}-v1.onnx.sha256").read_text()
    assert sha_line == f"{registry.sha['1']}  {pulled.name}\n"
    check = subprocess.run(["sha256sum", "-c", pulled.name + ".sha256"], cwd=pulled.parent)
    assert check.returncode == 0


def test_serving_continues_from_the_cache_when_the_server_is_down(
    registry, tmp_path, monkeypatch, caplog
):
    """Last in this module: it stops the tracking server."""
    from service_support import dicom_bytes, running_service, serve_config, synth_pixels

    from diagnostics.cli import _model_source, resolve_model_ref
    from diagnostics.serve.registry_client import RegistryClient, RegistryUnreachable
    from diagnostics.settings import get_settings

    monkeypatch.setenv("DIAGNOSTICS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DIAGNOSTICS_TRACKING_URI", registry.url)
    get_settings.cache_clear()
    try:
        ref = f"models:/{NAME}@champion"
        registry.set_alias("champion", "2")
        assert resolve_model_ref(ref)[1] == "2"  # cached in <home>/model-cache
        registry.stop()

        caplog.set_level(logging.WARNING, "diagnostics.serve.registry_client")
        path, version = resolve_model_ref(ref)
        assert version == "2" and path.name == f"{registry.sha['2']}.onnx"
        assert "cannot be reached" in caplog.text and "serving the cached file" in caplog.text
        with pytest.raises(RegistryUnreachable, match="no cached file"):
            resolve_model_ref(f"models:/{NAME}/1")  # never resolved on this machine

        # The service starts from the cache, scores, and its refresh keeps the model.
        cfg = serve_config(ref, tmp_path / "serve", qc={"ood": False})
        with RegistryClient(registry.url, get_settings().home / "model-cache") as client:
            source = client.follow(ref)
            caplog.clear()
            assert source("2") is None and source("2") is None
            assert caplog.text.count("still serving version 2") == 1  # one warning an outage
        with running_service(cfg, _model_source(cfg)) as svc:
            assert svc.app.state.holder.model.version == "2"
            assert svc.app.state.holder.refresh() is False
            assert svc.app.state.holder.last_error is None
            r = svc.upload(dicom_bytes(synth_pixels(1, seed=5)[0]))
            assert r.status_code == 202, r.text
            doc = svc.wait(r.json()["id"])
            assert doc["status"] == "scored"
            assert doc["findings"][0]["model_version"] == "2"
            assert doc["findings"][0]["model_sha256"] == registry.sha["2"]
            ready = httpx.get(f"{svc.url}/health/ready", timeout=30).json()
            assert ready["checks"]["model"]["version"] == "2"
    finally:
        get_settings.cache_clear()
