"""`diagnostics evaluate`: any exported ONNX model on any dataset config, through ONNX Runtime.

Images go through the same `imaging.load_for_model` preprocessing the clinic uses; thresholds
and temperatures come from the model's own metadata. A model trained elsewhere can thus be
validated on a site's data. Findings the model has but the dataset does not annotate are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diagnostics.data.cxr import load_dataset
from diagnostics.imaging import load_for_model
from diagnostics.train.metrics import finding_report


def registry_version(model: str) -> str | None:
    """The registry version a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI points at."""
    if not model.startswith("models:/"):
        return None
    import mlflow
    from mlflow import MlflowClient

    from diagnostics.settings import get_settings

    mlflow.set_tracking_uri(get_settings().mlflow_uri())
    ref = model[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    parts = ref.split("/")
    if len(parts) > 1 and parts[1] == "latest":
        found = MlflowClient().search_model_versions(f"name='{parts[0]}'")
        return str(max(int(v.version) for v in found)) if found else None
    return parts[1] if len(parts) > 1 else None


def resolve_model(model: str) -> Path:
    """A local .onnx path, or an MLflow registry URI (models:/name@alias) downloaded to a file."""
    if model.startswith("models:/"):
        import mlflow

        from diagnostics.settings import get_settings

        mlflow.set_tracking_uri(get_settings().mlflow_uri())
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
        except mlflow.exceptions.MlflowException as exc:
            raise FileNotFoundError(
                f"{model}: {exc.message.splitlines()[0]} (use models:/NAME/VERSION or "
                "models:/NAME@ALIAS for an alias that has been set)"
            ) from None
        found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
        if not found:
            raise FileNotFoundError(f"{model} holds no .onnx file")
        return found[0]
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {model}")
    return path


def evaluate(
    model: str | Path,
    data_cfg: Any,
    *,
    split: str = "val",
    batch_size: int = 16,
    n_boot: int = 1000,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    from diagnostics.serve.runner import OnnxModel

    runner = OnnxModel(resolve_model(str(model)), device=device)
    meta = runner.metadata
    table = load_dataset(data_cfg)
    frame = table.frame if split == "all" else table.frame[table.frame["split"] == split]
    if frame.empty:
        raise ValueError(
            f"split {split!r} is empty; splits here: {sorted(table.frame['split'].unique())}"
        )
    shared = [f for f in meta.labels if f in table.findings]
    if not shared:
        raise ValueError(f"the dataset annotates none of the model's findings {meta.labels}")
    probs, _ = score_paths(runner, frame["path"].tolist(), batch_size, progress)
    report = {}
    for f in shared:
        i = meta.labels.index(f)
        y = frame[f].to_numpy(dtype=np.float64)
        report[f] = finding_report(y, probs[:, i], meta.thresholds[f].value, n_boot=n_boot)
    aurocs = [r["auroc"] for r in report.values() if np.isfinite(r["auroc"])]
    return {
        "model": {
            "name": meta.name,
            "architecture": meta.architecture,
            "sha256": runner.sha256,
            "run_id": meta.run_id,
            "provider": runner.provider,
        },
        "dataset": {"source": table.source, "split": split, "images": len(frame)},
        "findings": report,
        "mean_auroc": float(np.mean(aurocs)) if aurocs else None,
        "skipped_findings": [f for f in meta.labels if f not in shared],
    }


def score_paths(
    runner: Any, paths: list[str], batch_size: int = 16, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities and raw logits (N, F) for image files, clinic preprocessing."""
    meta = runner.metadata
    probs = np.zeros((len(paths), len(meta.labels)))
    logits = np.zeros_like(probs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="score", unit="img", leave=False, disable=None)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        batch = np.stack([load_for_model(p, meta.preprocessing) for p in chunk])
        pred = runner.predict(batch)
        probs[start : start + len(chunk)] = pred.probabilities
        logits[start : start + len(chunk)] = pred.logits
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return probs, logits


def model_task(model: str) -> str:
    """'cxr' or 'risk', read from the model file's metadata."""
    import onnxruntime as ort

    from diagnostics.contract import ModelMetadata

    sess = ort.InferenceSession(str(resolve_model(model)), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map).task


def evaluate_risk(model: str, config: Path, overrides: list[str], n_boot: int = 1000) -> dict:
    """A risk model on every valid row of a risk config's table (schema from the model file)."""
    from diagnostics.data.clinical import validate_records
    from diagnostics.serve.risk import RiskModel
    from diagnostics.train.risk import calibration_slope_intercept, load_risk_config, load_source

    scorer = RiskModel(resolve_model(model))
    cfg = load_risk_config(config, overrides)
    schema = scorer.schema.model_copy(update={"outcome": cfg.table_schema.outcome})
    vt = validate_records(load_source(cfg.table), schema)
    p = scorer.predict(vt.X)
    r = finding_report(vt.y, p, scorer.threshold, n_boot=n_boot)
    r["calibration_slope"], r["calibration_intercept"] = calibration_slope_intercept(vt.y, p)
    return {
        "model": {
            "name": scorer.metadata.name,
            "architecture": scorer.metadata.architecture,
            "sha256": scorer.sha256,
            "run_id": scorer.metadata.run_id,
            "provider": "CPU",
        },
        "dataset": {
            "source": cfg.table,
            "split": "all rows",
            "images": len(vt.y),
            "rejected_rows": len(vt.rejected),
            "note": "every valid row is scored; rows the model was trained on make this "
            "optimistic: evaluate on another table or site",
        },
        "findings": {scorer.label: r},
        "mean_auroc": r["auroc"],
        "skipped_findings": [],
    }


def json_safe(obj: Any) -> Any:
    """NaN/Inf -> None, so the report is valid JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def render_report(result: dict[str, Any]) -> str:
    unit = "rows" if "rejected_rows" in result["dataset"] else "images"
    lines = [
        f"model {result['model']['name']} ({result['model']['architecture']}), "
        f"sha256 {result['model']['sha256'][:16]}..., provider {result['model']['provider']}",
        f"dataset {result['dataset']['source']}, split {result['dataset']['split']}: "
        f"{result['dataset']['images']:,} {unit}",
        "",
        f"{'finding':<22}{'n':>7}{'AUROC':>8}{'95% CI':>16}{'AUPRC':>8}{'thr':>7}"
        f"{'sens':>7}{'spec':>7}{'PPV':>7}{'NPV':>7}{'ECE':>7}",
    ]
    for f, r in result["findings"].items():
        ci = f"{r['auroc_lo']:.3f}-{r['auroc_hi']:.3f}"
        lines.append(
            f"{f:<22}{int(r['n']):>7}{r['auroc']:>8.3f}{ci:>16}"
            f"{r['auprc']:>8.3f}{r['threshold']:>7.3f}{r['sensitivity']:>7.3f}{r['specificity']:>7.3f}"
            f"{r['ppv']:>7.3f}{r['npv']:>7.3f}{r['ece']:>7.3f}"
        )
    if result["dataset"].get("note"):
        lines.append(f"note: {result['dataset']['note']}")
    mean = result["mean_auroc"]
    lines.append(f"mean AUROC {mean:.4f}" if mean is not None else "mean AUROC: n/a (one class)")
    if result["skipped_findings"]:
        lines.append(f"not annotated here, skipped: {', '.join(result['skipped_findings'])}")
    return "\n".join(lines)
