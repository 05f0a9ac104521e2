"""MLflow runs, dataset inputs, artefacts and the model registry.

The default store is SQLite with local artefacts under the project home (`settings.mlflow_uri()`);
MLFLOW_TRACKING_URI or DIAGNOSTICS_TRACKING_URI points elsewhere. Nothing identifying a patient
is logged: the dataset input holds labels and split only, and its digest is a hash.

Training code talks to a `Tracker`, chosen once by `make_tracker`: `MlflowTracker` logs, and
`NullTracker` (tracking off) has the same methods and does nothing, so the loops need no
`if tracking:` branches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from diagnostics import __version__

log = logging.getLogger(__name__)


def setup(tracking_uri: str, experiment: str, artifact_root: Path) -> str:
    """Point MLflow at the store and return the experiment ID (created if new).

    A local store (SQLite, files) keeps artefacts under `artifact_root`. A tracking server
    (http/https) chooses the location itself: `diagnostics tracking serve` proxies them
    (mlflow-artifacts:/), so clients need no access to its disk. A warning says when artefacts
    would land on this machine's disk instead: an experiment on a server with a local path
    (e.g. copied from an embedded store), or a database URI used directly, without a server."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        _check_artifact_location(tracking_uri, experiment, found.artifact_location)
        return found.experiment_id
    location = None
    if tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri:
        artifact_root.mkdir(parents=True, exist_ok=True)
        location = (artifact_root / experiment).resolve().as_uri()
    elif not tracking_uri.startswith(("http://", "https://")):
        from diagnostics.settings import redact_uri

        log.warning(
            "the tracking URI %s is a database, used without a tracking server: run "
            "artefacts go to ./mlruns on this machine, where no one else can read them. Point "
            "MLFLOW_TRACKING_URI at the tracking server instead (http://HOST:5000, started "
            "with `diagnostics tracking serve`)",
            redact_uri(tracking_uri),
        )
    experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
    created = mlflow.get_experiment(experiment_id)
    _check_artifact_location(tracking_uri, experiment, created.artifact_location)
    return experiment_id


def _check_artifact_location(tracking_uri: str, experiment: str, location: str | None) -> None:
    """On a tracking server, warn when the experiment's artefacts are not proxied: the mlflow
    client would write them to that path on *this* machine."""
    if not tracking_uri.startswith(("http://", "https://")) or not location:
        return
    from urllib.parse import urlparse

    if urlparse(location).scheme in ("", "file"):
        log.warning(
            "experiment %r keeps its artefacts at %s, a local path: this machine would write "
            "them to its own disk, not through the tracking server. Start the server with "
            "proxied artefacts (`diagnostics tracking serve`), and give the experiment a "
            "mlflow-artifacts:/ location (see README, 'A shared tracking server')",
            experiment,
            location,
        )


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.001", ...} for mlflow.log_params."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value, default=str) if not isinstance(value, str) else value
            out[name] = text[:6000]
    return out


def dataset_digest(frame: pd.DataFrame, findings: list[str]) -> str:
    """sha256 over image keys, labels and splits: changes when the data or its labels change."""
    h = hashlib.sha256()
    cols = ["image_id", *findings, "split"]
    h.update(",".join(cols).encode())
    h.update(pd.util.hash_pandas_object(frame[cols].astype(str), index=False).to_numpy().tobytes())
    return h.hexdigest()


def label_frame(frame: pd.DataFrame, findings: list[str]) -> pd.DataFrame:
    """Labels and split only (no paths, no patient keys): what a CXR dataset input may show."""
    return frame[[*findings, "split"]].reset_index(drop=True)


def log_dataset(frame: pd.DataFrame, findings: list[str], name: str, digest: str) -> None:
    """An MLflow dataset input with labels and split only (no paths, no patient keys)."""
    log_frame(label_frame(frame, findings), name, digest)


def log_frame(frame: pd.DataFrame, name: str, digest: str, targets: str | None = None) -> None:
    """`frame`, as it is, as the run's training dataset input."""
    import mlflow

    dataset = mlflow.data.from_pandas(frame, name=name, targets=targets, digest=digest[:32])
    mlflow.log_input(dataset, context="training")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def standard_tags(device: str) -> dict[str, str]:
    return {"git_commit": git_commit(), "package_version": __version__, "device": device}


def log_onnx_model(
    onnx_path: Path, example: np.ndarray | None, registered_model: str | None
) -> tuple[str | None, str | None]:
    """Log the ONNX file with a signature; register a new version. Returns (model_uri, version)."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    proto = onnx.load(str(onnx_path))
    signature = infer_signature(example.astype(np.float32)) if example is not None else None
    info = mlflow.onnx.log_model(
        proto,
        name="model",
        signature=signature,
        registered_model_name=registered_model,
        save_as_external_data=False,  # one file, as the clinic needs it
        await_registration_for=60,
    )
    version = getattr(info, "registered_model_version", None)
    int8_tags = _int8_artifact(onnx_path, proto)
    if registered_model and version is not None:
        # The clinic's registry client checks downloads against this (and, for versions
        # registered before this tag, against the run's onnx_sha256 tag).
        h = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
        client = mlflow.MlflowClient()
        client.set_model_version_tag(registered_model, str(version), "onnx_sha256", h)
        for key, value in int8_tags.items():  # the int8 artefact of the same version
            client.set_model_version_tag(registered_model, str(version), key, value)
    return info.model_uri, (str(version) if version is not None else None)


INT8_ARTIFACT = "int8/model.int8.onnx"  # run-relative; the version tag onnx_int8_path says so


def _int8_artifact(onnx_path: Path, proto: Any) -> dict[str, str]:
    """The int8 twin of `onnx_path` (model.int8.onnx beside it, quantised from this very
    model), logged to the active run under int8/ if it is not there yet; its tags
    (onnx_int8_sha256, onnx_int8_path, int8_gate) set on the run and returned for the model
    version. {} when there is no int8 file of this model."""
    import mlflow
    import onnx

    from diagnostics.contract import METADATA_KEY, ModelMetadata

    path = onnx_path.with_name("model.int8.onnx")
    if not path.is_file():
        return {}
    try:
        fp32 = ModelMetadata.from_json({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
        q8 = onnx.load(str(path), load_external_data=False)
        meta = ModelMetadata.from_json({p.key: p.value for p in q8.metadata_props}[METADATA_KEY])
    except (KeyError, ValueError, OSError) as exc:
        log.warning("%s not registered with the model: unreadable (%s)", path, exc)
        return {}
    if (meta.run_id, meta.created, meta.labels) != (fp32.run_id, fp32.created, fp32.labels):
        log.warning(
            "%s is not the quantisation of %s (a stale file?): not registered", path, onnx_path
        )
        return {}
    run = mlflow.active_run()
    if run is None:
        return {}
    folder = INT8_ARTIFACT.rsplit("/", 1)[0]
    present = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, folder)]
    if INT8_ARTIFACT not in present:
        mlflow.log_artifact(str(path), artifact_path=folder)
    tags = {
        "onnx_int8_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "onnx_int8_path": INT8_ARTIFACT,
        "int8_gate": meta.int8_gate.reason[:5000] if meta.int8_gate else "failed:no gate recorded",
    }
    mlflow.set_tags(tags)
    return tags


# --------------------------------------------------------------------------- trackers


class Tracker(Protocol):
    """What a training loop records. `enabled` is False only for `NullTracker`."""

    enabled: bool

    def run(self, run_name: str, run_id: str | None = None) -> Any:
        """Context manager: start (or, with `run_id`, reopen) a run and yield its ID; the run
        ends FINISHED, or FAILED when the block raises."""
        ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_dataset(
        self, frame: pd.DataFrame, name: str, digest: str, targets: str | None = None
    ) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None: ...

    def log_onnx_model(
        self, onnx_path: Path, example: np.ndarray | None, registered_model: str | None
    ) -> str | None:
        """Log the ONNX file, register it when `registered_model` is set; the version or None."""
        ...


class NullTracker:
    """Tracking off: every method does nothing; a run keeps the ID it was given (or None)."""

    enabled = False

    @contextmanager
    def run(self, run_name: str, run_id: str | None = None) -> Iterator[str | None]:
        yield run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_dataset(
        self, frame: pd.DataFrame, name: str, digest: str, targets: str | None = None
    ) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        pass

    def log_onnx_model(
        self, onnx_path: Path, example: np.ndarray | None, registered_model: str | None
    ) -> str | None:
        return None


class MlflowTracker:
    """Logs to the MLflow store at `tracking_uri`, in `experiment` (created if new)."""

    enabled = True

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path) -> None:
        self.tracking_uri, self.experiment, self.artifact_root = (
            tracking_uri,
            experiment,
            artifact_root,
        )

    @contextmanager
    def run(self, run_name: str, run_id: str | None = None) -> Iterator[str]:
        import mlflow

        experiment_id = setup(self.tracking_uri, self.experiment, self.artifact_root)
        mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_name)
        status = "FAILED"
        try:
            yield mlflow.active_run().info.run_id  # type: ignore[union-attr]
            status = "FINISHED"
        finally:
            mlflow.end_run(status=status)

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.log_params(dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics(dict(metrics), step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        mlflow.set_tags(dict(tags))

    def log_dataset(
        self, frame: pd.DataFrame, name: str, digest: str, targets: str | None = None
    ) -> None:
        log_frame(frame, name, digest, targets)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def log_onnx_model(
        self, onnx_path: Path, example: np.ndarray | None, registered_model: str | None
    ) -> str | None:
        return log_onnx_model(onnx_path, example, registered_model)[1]


def make_tracker(enabled: bool, experiment: str) -> MlflowTracker | NullTracker:
    """MLflow at the configured store (`settings.mlflow_uri()`) when `enabled`, else nothing."""
    if not enabled:
        return NullTracker()
    from diagnostics.settings import get_settings

    settings = get_settings()
    return MlflowTracker(settings.mlflow_uri(), experiment, settings.artifact_root)
