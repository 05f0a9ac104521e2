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
