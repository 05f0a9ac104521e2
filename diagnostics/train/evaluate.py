"""`diagnostics evaluate`: any exported ONNX model on any dataset config, through ONNX Runtime.

Images go through the same `imaging.load_for_model` preprocessing the clinic uses; thresholds
and temperatures come from the model's own metadata. A model trained elsewhere can thus be
validated on a site's data. Findings the model has but the dataset does not annotate are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

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
                f"{model}: {exc.message.splitlines()[0]} in the tracking store "
                f"{get_settings().mlflow_uri()} (run from the folder whose .diagnostics/ holds "
                "it, or set DIAGNOSTICS_HOME or MLFLOW_TRACKING_URI; use models:/NAME/VERSION, "
                "or models:/NAME@ALIAS for an alias that has been set)"
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
    population_check: bool = True,
    qc_config: Any = None,
) -> dict[str, Any]:
    """Metrics on what the clinic would score, with what it would not counted by reason.

    Every image goes through the clinic's own path (`serve.runner.Scorer`: decode, QC, the
    intended population, the model, the OOD check). With `population_check` (the default),
    metrics cover only the images the clinic would score with a call; refused and flagged
    images are counted by code, never silently scored. Without it, every image the model can
    read is scored, and the report says how many of them the clinic would have withheld.
    """
    from diagnostics.serve.qc import QCConfig
    from diagnostics.serve.runner import OnnxModel, Scorer

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
    paths = frame["path"].tolist()
    # Flag rather than refuse: the population decision is then known for every image, and a
    # flagged image still has the model's output for the unchecked mode.
    qc_cfg = (qc_config or QCConfig()).model_copy(update={"population": "flag"})
    verdicts = clinic_verdicts(Scorer(runner, qc_cfg, batch_size=batch_size), paths, progress)
    withheld = np.array([v["status"] != "scored" or bool(v["flags"]) for v in verdicts])
    if population_check:
        keep = ~withheld
        probs = np.array(
            [v["probabilities"] for v, k in zip(verdicts, keep, strict=True) if k], dtype=float
        ).reshape(-1, len(meta.labels))
    else:  # only the model's own judgements (OOD, population) are set aside
        from diagnostics.serve.qc import OOD, OUTSIDE_POPULATION

        keep = np.array(
            [
                v["status"] == "scored"
                or (v["status"] == "failed_qc" and v["code"] in (OOD, OUTSIDE_POPULATION))
                for v in verdicts
            ]
        )
        probs, _ = score_paths(
            runner, [p for p, k in zip(paths, keep, strict=True) if k], batch_size, progress
        )
    scored = frame[keep]
    report = {}
    for f in shared:
        i = meta.labels.index(f)
        y = scored[f].to_numpy(dtype=np.float64)
        report[f] = finding_report(y, probs[:, i], meta.thresholds[f].value, n_boot=n_boot)
    aurocs = [r["auroc"] for r in report.values() if np.isfinite(r["auroc"])]
    qc = qc_summary(verdicts, population_check)
    pop = meta.population
    if pop is not None and pop.age_years is not None and "age" in scored:
        ages = pd.to_numeric(scored["age"], errors="coerce")
        outside = ages.notna() & ~ages.map(lambda a: pop.age_inside(float(a)) if a == a else True)
        qc["scored_outside_ages_by_table"] = int(outside.sum())  # the dataset's own age column
    return {
        "model": {
            "name": meta.name,
            "architecture": meta.architecture,
            "sha256": runner.sha256,
            "run_id": meta.run_id,
            "provider": runner.provider,
            "population": pop.age_text() if pop is not None else None,
        },
        "dataset": {"source": table.source, "split": split, "images": len(frame)},
        "qc": qc,
        "findings": report,
        "mean_auroc": float(np.mean(aurocs)) if aurocs else None,
        "skipped_findings": [f for f in meta.labels if f not in shared],
    }


def clinic_verdicts(scorer: Any, paths: list[str], progress: bool) -> list[dict[str, Any]]:
    """The clinic's verdict per image file: status, code, flags, probabilities (or None)."""
    out = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="score", unit="img", leave=False, disable=None)
    step = max(scorer.batch_size * 4, 16)
    for start in range(0, len(paths), step):
        chunk = paths[start : start + step]
        for r in scorer.score_many([Path(p).read_bytes() for p in chunk]):
            out.append(
                {
                    "status": r.status,
                    "code": r.code,
                    "flags": list(r.flags),
                    "probabilities": [f.probability for f in r.findings] or None,
                }
            )
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


def qc_summary(verdicts: list[dict[str, Any]], applied: bool) -> dict[str, Any]:
    """What the clinic would score with a call, and what it would withhold, by reason: refused
    by QC (e.g. out_of_distribution), outside the intended population (refused, or flagged
    where a site chooses), or failed."""
    reasons: dict[str, int] = {}
    for v in verdicts:  # one reason per image: its refusal, else its flag
        reason = v["code"] if v["status"] != "scored" else (v["flags"] or [None])[0]
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
    withheld = sum(reasons.values())
    return {
        "applied": applied,
        "images": len(verdicts),
        "scored_with_a_call": len(verdicts) - withheld,
        "withheld": withheld,
        "withheld_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
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
    from diagnostics.serve.risk import RiskModel
    from diagnostics.tables import validate_records
    from diagnostics.train.metrics import calibration_fields
    from diagnostics.train.risk import load_risk_config, load_source

    scorer = RiskModel(resolve_model(model))
    cfg = load_risk_config(config, overrides)
    schema = scorer.schema.model_copy(update={"outcome": cfg.table_schema.outcome})
    vt = validate_records(load_source(cfg.table), schema)
    p = scorer.predict(vt.X)
    r = finding_report(vt.y, p, scorer.threshold, n_boot=n_boot)
    r.update(calibration_fields(vt.y, p))  # slope NaN with calibration_note where undefined
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


def qc_lines(qc: dict[str, Any] | None, population: str | None) -> list[str]:
    """The clinic's verdicts in words: what was scored, what was withheld and why."""
    if not qc:
        return []
    reasons = ", ".join(f"{k} {v}" for k, v in qc["withheld_by_reason"].items()) or "none"
    made_for = f" (the model is made for {population})" if population else ""
    lines = []
    if qc["applied"]:
        lines.append(
            f"clinic QC and population check ON{made_for}: metrics below are on the "
            f"{qc['scored_with_a_call']:,} images the clinic would score with a call; "
            f"{qc['withheld']:,} withheld: {reasons}"
        )
    else:
        lines.append(
            f"WARNING: population check OFF (--no-population-check): every readable image is "
            f"scored below, including {qc['withheld']:,} the clinic would withhold{made_for}: "
            f"{reasons}"
        )
    if qc["applied"] and qc["scored_with_a_call"] == 0:
        lines.append("no image would be scored with a call: there are no metrics below")
    if qc.get("scored_outside_ages_by_table"):
        lines.append(
            f"WARNING: {qc['scored_outside_ages_by_table']:,} scored images are outside the "
            "model's ages by the dataset's own age column"
        )
    return lines


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
        *qc_lines(result.get("qc"), result["model"].get("population")),
        "",
        f"{'finding':<22}{'n':>7}{'AUROC':>8}{'95% CI':>16}{'AUPRC':>8}{'thr':>7}"
        f"{'sens':>7}{'spec':>7}{'PPV':>7}{'NPV':>7}{'ECE':>7}",
    ]
    for f, r in result["findings"].items():
        ci = f"{r['auroc_lo']:.3f}-{r['auroc_hi']:.3f}"
        lines.append(
            f"{f:<22}{int(r['n']):>7}{r['auroc']:>8.3f}{ci:>16}"
            f"{r['auprc']:>8.3f}{r['threshold']:>7.3f}"
            f"{r['sensitivity']:>7.3f}{r['specificity']:>7.3f}"
            f"{r['ppv']:>7.3f}{r['npv']:>7.3f}{r['ece']:>7.3f}"
        )
    if result["dataset"].get("note"):
        lines.append(f"note: {result['dataset']['note']}")
    mean = result["mean_auroc"]
    lines.append(f"mean AUROC {mean:.4f}" if mean is not None else "mean AUROC: n/a (one class)")
    if result["skipped_findings"]:
        lines.append(f"not annotated here, skipped: {', '.join(result['skipped_findings'])}")
    return "\n".join(lines)
