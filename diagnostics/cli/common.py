"""What every command shares: options, errors, config loading, the training-install guard."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a config value: a.b=value (repeatable)"),
]
ServeConfigOption = Annotated[Path, typer.Option("--config", "-c", help="service config (YAML)")]
DEFAULT_SERVE_CONFIG = Path("configs/serve.yaml")


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


# What `pip install 'diagnostics[train]'` adds to a clinic install (which has none of these).
TRAINING_MODULES = frozenset(
    {
        "torch",
        "torchvision",
        "monai",
        "mlflow",
        "sklearn",
        "skl2onnx",
        "onnx",
        "scipy",
        "matplotlib",
    }
)


def _training(command: Callable[..., Any]) -> Callable[..., Any]:
    """For commands that train, evaluate or govern models: on a clinic install (no torch,
    mlflow or scikit-learn) they stop with the install line instead of a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ImportError as exc:
            missing = (exc.name or "").split(".")[0]
            if missing not in TRAINING_MODULES:
                raise
            raise _fail(
                f"this command needs the training libraries, and {missing} is not installed "
                "here (a clinic install): pip install 'diagnostics[train]'"
            ) from None

    return run


def load_data_config(config: Path, overrides: list[str] | None) -> Any:
    """The `data:` section of a config file (a dataset config, or a training config holding one)."""
    from pydantic import ValidationError

    from diagnostics.configio import ConfigError, apply_overrides, load_yaml, validation_lines
    from diagnostics.data.config import SOURCES, parse_dataset_config

    outside = [o for o in overrides or [] if not o.strip().startswith("data.")]
    if outside:
        raise _fail(f"--set {outside[0]}: this command reads only the data: section; use data.KEY")
    try:
        raw = apply_overrides(load_yaml(config), overrides or [])
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    section = raw.get("data", raw if "source" in raw else None)
    if not isinstance(section, dict):
        raise _fail(f"{config}: no 'data:' section")
    try:
        return parse_dataset_config(section)
    except ValidationError as exc:
        source = f"{config} with --set overrides" if overrides else str(config)
        lines = validation_lines(exc, "data", SOURCES)
        raise _fail(f"{source}: invalid data config:\n{lines}") from None


def _load_train_config(config: Path, overrides: list[str] | None) -> Any:
    from diagnostics.configio import ConfigError
    from diagnostics.train.config import load_train_config

    try:
        return load_train_config(config, overrides)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _serve_config(config: Path, overrides: list[str] | None) -> Any:
    from pydantic import ValidationError

    from diagnostics.configio import ConfigError, apply_overrides, load_yaml, validation_lines
    from diagnostics.serve.config import ServeConfig

    try:
        if not config.is_file() and config != DEFAULT_SERVE_CONFIG:
            raise ConfigError(f"{config} not found")
        # Without the default file (run outside the project), the embedded defaults apply.
        raw = apply_overrides(load_yaml(config) if config.is_file() else {}, overrides or [])
        return ServeConfig.model_validate(raw)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    except ValidationError as exc:
        where = f"{config} with --set" if overrides else str(config)
        raise _fail(f"{where}:\n{validation_lines(exc)}") from None


def _open_store(cfg: Any) -> Any:
    """The service's store (migrated) and its data folder."""
    from diagnostics.serve.store import Store
    from diagnostics.settings import get_settings

    home = get_settings().home
    data_dir = cfg.resolved_data_dir(home)
    store = Store(cfg.resolved_database_url(home), data_dir / "blobs")
    store.migrate()
    return store, data_dir


def _mlflow_ui_hint() -> str:
    from diagnostics.settings import get_settings, redact_uri

    settings = get_settings()
    uri = settings.mlflow_uri()
    if uri.startswith("sqlite:"):
        return (
            f"open the MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} "
            f"--default-artifact-root {settings.artifact_root.resolve().as_uri()} --port 5000"
        )
    return f"open the MLflow UI of {redact_uri(uri)}"  # a database URI may hold a password
