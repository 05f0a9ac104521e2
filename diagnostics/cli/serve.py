"""`diagnostics serve` and `worker`: the clinic service, and a worker on its own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from diagnostics.cli import registry
from diagnostics.cli.common import (
    DEFAULT_SERVE_CONFIG,
    ServeConfigOption,
    SetOption,
    _fail,
    _open_store,
    _serve_config,
)


def _service_model_cache(cfg: Any) -> Path:
    from diagnostics.settings import get_settings

    return cfg.resolved_data_dir(get_settings().home) / "model-cache"


def _apply_thread_rule(cfg: Any) -> None:
    """Fix this process's ONNX Runtime intra-op thread count once, at start, and log it:
    `model.threads`, or (0) max(1, cores // worker.per_host). Written back into
    `cfg.model.threads`, so that a model switched in later (and the risk models) get the same."""
    import logging

    from diagnostics.serve.worker import threads_rule

    threads, why = threads_rule(cfg.model.threads, cfg.worker.per_host)
    cfg.model.threads = threads
    logging.getLogger("diagnostics.serve.worker").info(
        "ONNX Runtime threads: intra-op %s, inter-op %s (%s)",
        threads or "default",
        1 if threads else "default",
        why,
    )


def load_clinic_model(
    ref: str,
    path: Path,
    version: str | None,
    *,
    precision: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    expected_sha256: str | None = None,
    expected_int8_sha256: str | None = None,
    cache_dir: Path | None = None,
    flags: set[str] | None = None,
) -> Any:
    """The OnnxModel the clinic runs for a resolved model (`ref` as configured, its fp32
    `path` and registry `version`): its int8 variant or the fp32 file, by `precision`
    (auto | fp32 | int8; serve/precision.py), with the reason recorded in the model
    (`describe()`, /health/ready) and logged. `expected_sha256` is the fp32 file's, checked
    whichever file runs. Raises PrecisionError (precision int8 that cannot run),
    ModelIntegrityError, FileNotFoundError, ValueError."""
    import logging

    import onnxruntime as ort

    from diagnostics.contract import file_sha256
    from diagnostics.serve import precision as prec
    from diagnostics.serve.runner import CUDA, ModelIntegrityError, OnnxModel

    if expected_sha256 and expected_sha256.strip().lower() != (sha := file_sha256(path)):
        raise ModelIntegrityError(
            f"model file sha256 {sha} does not match the expected {expected_sha256}"
        )
    if precision == "fp32":
        choice = prec.choose("fp32", path, None)
    else:
        twin, note = registry.resolve_int8(ref, path, version, cache_dir)
        if twin is not None and not ref.startswith("models:/"):
            # a local twin: the registry's sha256 tag does not vouch for it, so it runs only as
            # pinned as the fp32 file is (a pinned fp32 file needs a pinned twin)
            twin, note = _pinned_local_twin(twin, expected_sha256, expected_int8_sha256, note)
        meta8 = None
        if twin is not None:
            try:
                meta8 = prec.read_metadata(twin)
            except Exception as exc:  # an unreadable int8 file: fp32 serves (auto)
                twin, note = None, f"{twin.name} is unreadable ({type(exc).__name__})"
        gpu = device in ("auto", "cuda") and CUDA in ort.get_available_providers()
        choice = prec.choose(
            precision,
            path,
            twin,
            int8_metadata=meta8,
            fp32_metadata=prec.read_metadata(path) if meta8 is not None else None,
            missing=note,
            flags=flags,
            gpu=gpu,
        )
    model = OnnxModel(
        choice.path,
        device=device,  # type: ignore[arg-type]
        threads=threads,
        version=version,
        precision_reason=choice.reason,
    )
    logging.getLogger("diagnostics.serve.precision").info(
        "model %s: precision %s (%s)", ref, model.precision, choice.reason
    )
    return model


def _pinned_local_twin(
    twin: Path, fp32_pin: str | None, int8_pin: str | None, note: str | None
) -> tuple[Path | None, str | None]:
    """The local int8 twin, if it may run: checked against `int8_pin` when given; refused
    (None, why) when the fp32 file is pinned and the twin is not, or when it does not match."""
    from diagnostics.contract import file_sha256

    if int8_pin:
        got = file_sha256(twin)
        if got != int8_pin.strip().lower():
            return None, f"{twin.name} has sha256 {got[:12]}, not the pinned {int8_pin[:12]}"
        return twin, note
    if fp32_pin:
        return None, (
            f"the fp32 file is pinned by sha256 and {twin.name} is not "
            "(set model.int8_sha256 to run it)"
        )
    return twin, note


def _load_service_model(cfg: Any) -> Any:
    from diagnostics.serve.precision import PrecisionError
    from diagnostics.serve.runner import ModelIntegrityError

    _apply_thread_rule(cfg)
    try:
        path, version = registry.resolve(cfg.model.path, _service_model_cache(cfg))
        return _model_loader(cfg, pinned=True)(path, version)
    except PrecisionError as exc:
        raise _fail(f"model {cfg.model.path}: {exc}") from None
    except FileNotFoundError as exc:
        if cfg.model.path.startswith("models:/"):  # the registry said why
            raise _fail(f"model {cfg.model.path}: {exc}") from None
        raise _fail(
            f"model {cfg.model.path}: {exc} (train one with `make demo`, or set model.path)"
        ) from None
    except (ValueError, ModelIntegrityError) as exc:
        raise _fail(f"model {cfg.model.path}: {exc}") from None


def _model_loader(cfg: Any, *, pinned: bool = False) -> Any:
    """Loads a resolved (file, version) as the clinic runs it: its int8 twin where it passed
    its gate (`model.precision`). `pinned`: the configured file, checked against
    `model.sha256` / `model.int8_sha256`; a model switch (the alias moved) loads a new version,
    which those pins cannot name."""
    cache = _service_model_cache(cfg)

    def load(path: Path, version: str | None) -> Any:
        return load_clinic_model(
            cfg.model.path,
            path,
            version,
            precision=cfg.model.precision,
            device=cfg.model.device,
            threads=cfg.model.threads or None,
            expected_sha256=cfg.model.sha256 if pinned else None,
            expected_int8_sha256=cfg.model.int8_sha256 if pinned else None,
            cache_dir=cache,
        )

    return load


def _load_risk_models(cfg: Any) -> dict[str, Any]:
    """The risk models named in the config's `risk.models`, each resolved once, at start."""
    from diagnostics.serve.risk import RiskModel
    from diagnostics.serve.runner import ModelIntegrityError

    models: dict[str, Any] = {}
    for name, entry in cfg.risk.models.items():
        try:
            path, version = registry.resolve(entry.path, _service_model_cache(cfg))
            model = RiskModel(path, threads=cfg.model.threads or None, version=version)
            if entry.sha256 and model.sha256 != entry.sha256:
                raise ModelIntegrityError(
                    f"sha256 {model.sha256[:12]} is not the configured {entry.sha256[:12]}"
                )
        except (FileNotFoundError, ValueError, ModelIntegrityError) as exc:
            raise _fail(f"risk model {name} ({entry.path}): {exc}") from None
        models[name] = model
    return models


def _check_port_free(host: str, port: int) -> None:
    """Fail before loading anything (or starting a worker) when the address is taken."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As uvicorn binds: connections of a previous run left in TIME_WAIT must not block a
        # restart (a supervisor restarting after a crash); a live listener still does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _model_source(cfg: Any) -> Any:
    """For a registry URI: a source the service polls, returning a new (file, version) when the
    alias (or `latest`) points elsewhere. A plain file never changes under the service."""
    ref = cfg.model.path
    if not ref.startswith("models:/"):
        return None
    client = registry.registry_client(_service_model_cache(cfg))
    if client is not None:  # a tracking server: followed over REST, without mlflow
        return client.follow(ref)

    def source(current: str | None) -> tuple[Path, str | None] | None:
        evaluate = registry._local_registry()
        registry_version, resolve_model = evaluate.registry_version, evaluate.resolve_model

        version = registry_version(ref)
        if version is None or version == current:
            return None
        return resolve_model(
            f"models:/{ref[len('models:/') :].split('@')[0].split('/')[0]}/{version}"
        ), version

    return source


def serve(
    config: ServeConfigOption = DEFAULT_SERVE_CONFIG,
    set_: SetOption = None,
    host: Annotated[str | None, typer.Option(help="overrides the config's host")] = None,
    port: Annotated[int | None, typer.Option(help="overrides the config's port")] = None,
    dev: Annotated[
        bool, typer.Option("--dev", help="allow auth: false, on a loopback address only")
    ] = False,
) -> None:
    """Run the clinic scoring service (FastAPI + uvicorn), with its worker in-process."""
    import uvicorn

    from diagnostics.serve import logs
    from diagnostics.serve.app import create_app
    from diagnostics.serve.config import check_auth_setting
    from diagnostics.serve.server import uvicorn_config

    cfg = _serve_config(config, set_)
    per_host = os.environ.get("DIAGNOSTICS_WORKERS_PER_HOST", "").strip()
    if per_host:  # as for `diagnostics worker`: this process's in-process worker counts as one
        try:
            cfg.worker.per_host = max(1, int(per_host))
        except ValueError:
            raise _fail(f"DIAGNOSTICS_WORKERS_PER_HOST={per_host!r} is not a number") from None
    if host is not None:
        cfg.host = host
    if port is not None:
        cfg.port = port
    try:
        check_auth_setting(cfg, dev)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    _check_port_free(cfg.host, cfg.port)
    if cfg.dicom.enabled:
        _check_port_free(cfg.dicom.host, cfg.dicom.port)
    logs.configure()
    model = _load_service_model(cfg)
    store, data_dir = _open_store(cfg)
    risk_models = _load_risk_models(cfg)
    api = create_app(
        cfg, model, store, data_dir, _model_source(cfg), risk_models, _model_loader(cfg)
    )
    uvicorn.Server(uvicorn_config(api, cfg, host=cfg.host, port=cfg.port)).run()


def worker(
    config: ServeConfigOption = DEFAULT_SERVE_CONFIG,
    set_: SetOption = None,
    workers_per_host: Annotated[
        int | None,
        typer.Option(
            "--workers-per-host",
            min=1,
            envvar="DIAGNOSTICS_WORKERS_PER_HOST",
            help="scoring processes sharing this machine's cores (overrides worker.per_host); "
            "with model.threads 0 each takes max(1, cores // N) ONNX Runtime threads",
        ),
    ] = None,
) -> None:
    """Run a scoring worker on its own, against the service's database and blob store.
    Any number may share one PostgreSQL database, on one machine or several."""
    import signal
    import threading

    from diagnostics.serve import logs
    from diagnostics.serve.models import ModelHolder
    from diagnostics.serve.worker import worker_for

    cfg = _serve_config(config, set_)
    if workers_per_host is not None:
        cfg.worker.per_host = workers_per_host
    logs.configure()
    model = _load_service_model(cfg)
    store, data_dir = _open_store(cfg)
    holder = ModelHolder(model, cfg, data_dir / "heatmaps", _model_source(cfg), _model_loader(cfg))
    w = worker_for(store, holder, cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if holder.source is not None and cfg.model.refresh_s > 0:
        threading.Thread(target=holder.run, args=(stop, cfg.model.refresh_s), daemon=True).start()
    w.run(stop)
