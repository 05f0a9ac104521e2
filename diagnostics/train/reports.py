"""What a CXR run records: its setup and results in MLflow, metrics.json and model_card.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from diagnostics.train import tracking
from diagnostics.train.calibrate import Calibration, flat_report
from diagnostics.train.cards import cxr_model_card
from diagnostics.train.config import CXRTrainConfig
from diagnostics.train.cxr_data import CXRData
from diagnostics.train.export import Exported
from diagnostics.train.qc_references import QCReferences
from diagnostics.train.runtime import PhaseClock, Runtime


def log_setup(
    tracker: tracking.Tracker, cfg: CXRTrainConfig, data: CXRData, runtime: Runtime, digest: str
) -> None:
    """A new run's config, device and precision, standard tags and dataset input."""
    tracker.log_params(tracking.flatten(cfg.model_dump(mode="json")))
    tracker.log_params(
        {
            "device": runtime.device.type,
            "precision": runtime.precision,
            "findings": ",".join(data.findings),
        }
    )
    tracker.set_tags(tracking.standard_tags(f"{runtime.device.type}:{runtime.precision}"))
    frame = tracking.label_frame(data.table.frame, data.findings)
    tracker.log_dataset(frame, f"{cfg.name}:{cfg.data.source}", digest)


def write_reports(
    run_dir: Path,
    data: CXRData,
    cal: Calibration,
    qc: QCReferences,
    exported: Exported,
    int8: dict[str, Any] | None,
    clock: PhaseClock,
    history: list[dict[str, float]],
) -> None:
    """run_dir/metrics.json and run_dir/model_card.md."""
    metrics_doc = {
        "findings": data.findings,
        "val": cal.val,
        "test": cal.test,
        "mean_val_auroc": cal.mean_val_auroc,
        "onnx_parity_max_abs_diff": exported.parity,
        "sha256": exported.sha256,
        "int8": int8,
        "population": qc.population_report,
        "timing_s": {k: round(v, 1) for k, v in clock.seconds.items()},  # mlflow logging: after
        "history": history,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics_doc, indent=2, default=float))
    (run_dir / "model_card.md").write_text(
        cxr_model_card(exported.metadata, cal.val, cal.test, data.table, exported.sha256)
    )


def log_results(
    tracker: tracking.Tracker,
    cfg: CXRTrainConfig,
    run_dir: Path,
    cal: Calibration,
    qc: QCReferences,
    exported: Exported,
    int8: dict[str, Any] | None,
    clock: PhaseClock,
) -> str | None:
    """Metrics, tags, files and plots; log the ONNX model and register it if configured.
    Returns the registered version."""
    tracker.log_metrics(cal.flat)
    tracker.log_metrics({"onnx_parity_max_abs_diff": exported.parity})
    if cal.test:
        tracker.log_metrics(flat_report("test", cal.test))
    tracker.set_tags({"onnx_sha256": exported.sha256})
    population = qc.population_report
    if population is not None:
        tracker.log_metrics(
            {
                f"population.{k}": float(v)
                for k, v in population["metrics"].items()
                if np.isfinite(v)
            }
        )
        tracker.log_metrics({"population.threshold": population["threshold"]})
        tracker.set_tags({"population.rule": population["rule"][:5000]})
    if int8 is not None:
        tracker.log_metrics({f"int8.{k}": v for k, v in int8.items() if isinstance(v, float)})
        tracker.log_artifact(Path(int8["path"]), artifact_path="int8")
        tracker.set_tags({"onnx_int8_sha256": int8["sha256"]})
    for name in ("config.yaml", "metrics.json", "model_card.md"):
        tracker.log_artifact(run_dir / name)
    tracker.log_artifacts(cal.plots_dir, artifact_path="plots")
    version = tracker.log_onnx_model(
        exported.onnx_path, exported.inputs[:1], cfg.tracking.registered_model
    )
    clock.lap("mlflow" if tracker.enabled else None)  # an untracked run has no MLflow phase
    tracker.log_metrics({f"time.{k}_s": v for k, v in clock.seconds.items()})
    return version
