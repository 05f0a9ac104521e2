"""Model references -> local ONNX files: a path as given, or a registry URI (`models:/NAME@ALIAS`)
resolved over the tracking server's REST API (no mlflow), or with mlflow for a local store.

Commands call `resolve` and `registry_client`, which look `resolve_model_ref` and
`_registry_client` up on the `diagnostics.cli` package when they run: a script that swaps them
there (benchmarks/clinic_footprint.py reproduces the CLI before the REST client so) changes
every command, as it did when the CLI was one module.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from diagnostics.cli.common import TRAINING_MODULES


def _package() -> ModuleType:
    import diagnostics.cli

    return diagnostics.cli


def resolve(model: str, cache_dir: Path | None = None) -> tuple[Path, str | None]:
    """`resolve_model_ref`, as the package holds it."""
    result: tuple[Path, str | None] = _package().resolve_model_ref(model, cache_dir)
    return result


def registry_client(cache_dir: Path | None = None) -> Any:
    """`_registry_client`, as the package holds it."""
    return _package()._registry_client(cache_dir)


def _model_cache(cache_dir: Path | None = None) -> Path:
    """Where registry downloads are cached by sha256: the service's data folder when serving,
    else <home>/model-cache."""
    from diagnostics.settings import get_settings

    return cache_dir or get_settings().home / "model-cache"


def _registry_client(cache_dir: Path | None = None) -> Any:
    """The REST registry client (no mlflow) when the tracking URI is a server, else None."""
    from diagnostics.settings import get_settings

    uri = get_settings().mlflow_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    from diagnostics.serve.registry_client import RegistryClient

    return RegistryClient(uri, _model_cache(cache_dir))


def _local_registry() -> Any:
    """diagnostics.train.evaluate, which reads a local tracking store (SQLite, files) with
    mlflow; a clear error where mlflow is not installed (a clinic install)."""
    from diagnostics.settings import get_settings

    try:
        from diagnostics.train import evaluate
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in TRAINING_MODULES:
            raise
        raise FileNotFoundError(
            f"the tracking store {get_settings().mlflow_uri()} is local and is read with "
            f"mlflow, which is not installed here ({exc.name} is missing). Point "
            "DIAGNOSTICS_TRACKING_URI (or MLFLOW_TRACKING_URI) at the MLflow tracking server "
            "(http://HOST:PORT), give the .onnx file itself (`diagnostics models pull` writes "
            "one), or pip install 'diagnostics[train]'"
        ) from None
    return evaluate


def resolve_model_ref(model: str, cache_dir: Path | None = None) -> tuple[Path, str | None]:
    """A model argument -> (local .onnx path, registry version or None).

    Registry URIs of a tracking server (http/https) are resolved over its REST API, without
    mlflow, and cached by sha256 in `cache_dir` (default <home>/model-cache); when the server
    cannot be reached, the file cached for that URI is used, with a warning. A local store
    (SQLite, as `make demo` makes) is read with mlflow. The serving modules never import
    mlflow; they read the ONNX file directly and never unpickle anything.
    """
    if not model.startswith("models:/"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {model}")
        return path, None
    client = registry_client(cache_dir)
    if client is not None:
        with client:
            found = client.resolve(model)
        return found.path, found.version
    evaluate = _local_registry()
    registry_version, resolve_model = evaluate.registry_version, evaluate.resolve_model

    path = resolve_model(model)
    try:
        version = registry_version(model)
    except Exception:  # the file is what matters; the version is provenance
        version = None
    return path, version


def int8_twin(path: Path) -> Path:
    """Where a local model file's int8 variant lives: model.onnx -> model.int8.onnx beside it."""
    return path.with_name(path.name[: -len(".onnx")] + ".int8.onnx")


def resolve_int8(
    model: str, path: Path, version: str | None, cache_dir: Path | None = None
) -> tuple[Path | None, str]:
    """The int8 variant of a resolved model: (file, "") or (None, why there is none).

    A local file: model.int8.onnx beside model.onnx. A registry URI: the version's int8
    artefact (tag onnx_int8_sha256), downloaded and checked against that sha256 as the fp32
    file is: over REST from a tracking server, with mlflow from a local store."""
    if not model.startswith("models:/"):
        twin = int8_twin(path)
        return (twin, "") if twin.is_file() else (None, f"no {twin.name} beside {path.name}")
    client = registry_client(cache_dir)
    if client is not None:
        with client:
            found = client.resolve(model, int8=True)
        if found.version != version or found.sha256 != _sha256(path):
            return None, "the registry moved while resolving; int8 not looked up"
        return found.int8_path, found.int8_note
    return _local_store_int8(model, version, cache_dir)


def _sha256(path: Path) -> str:
    from diagnostics.contract import file_sha256

    return file_sha256(path)


def _local_store_int8(
    model: str, version: str | None, cache_dir: Path | None = None
) -> tuple[Path | None, str]:
    """The int8 artefact of a version in a local tracking store (read with mlflow), copied once
    into the cache (`cache_dir`, else DIAGNOSTICS_HOME/cache) under registry-int8/NAME/VERSION:
    a restart or a model switch finds it there, and no temporary folder is left behind."""
    import re

    if version is None:
        return None, "no registry version known"
    _local_registry()  # a clear error where mlflow is missing
    import mlflow

    from diagnostics.serve.registry_client import (
        INT8_DEFAULT_PATH,
        INT8_PATH_TAG,
        INT8_SHA256_TAG,
    )
    from diagnostics.settings import get_settings

    name = model[len("models:/") :].split("@")[0].split("/")[0]
    mlflow.set_tracking_uri(get_settings().mlflow_uri())
    mv = mlflow.MlflowClient().get_model_version(name, version)
    expected = (mv.tags or {}).get(INT8_SHA256_TAG, "")
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        return None, f"models:/{name}/{version} has no int8 artefact (no {INT8_SHA256_TAG})"
    rel = (mv.tags or {}).get(INT8_PATH_TAG) or INT8_DEFAULT_PATH
    folder = (cache_dir or get_settings().cache_dir) / "registry-int8" / name / str(version)
    cached = folder / Path(rel).name
    if cached.is_file() and _sha256(cached) == expected:
        return cached, ""
    folder.mkdir(parents=True, exist_ok=True)
    import tempfile

    # Downloaded beside, then renamed into place: another process never sees half a file.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        try:
            got = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=mv.run_id, artifact_path=rel, dst_path=tmp
                )
            )
        except mlflow.exceptions.MlflowException as exc:
            return None, (
                f"models:/{name}/{version}: int8 artefact unreadable ({exc.message[:200]})"
            )
        local = folder / Path(rel).name
        got.replace(local)  # the same file system: an atomic rename
    sha = _sha256(local)
    if sha != expected:
        return None, (
            f"models:/{name}/{version}: the int8 artefact has sha256 {sha[:12]}…, but training "
            f"recorded {expected[:12]}…; not used"
        )
    return local, ""
