"""`diagnostics train risk`: a calibrated tabular risk model, its governance metrics, MLflow, ONNX.

Out-of-fold (cross-validated) predictions on the training split choose the operating threshold
and give the CV metrics; the held-out test split gives the test metrics, subgroups, decision
curve, permutation importance and the ONNX parity check.

With `split.strategy: leave_one_group_out` (e.g. `group: SiteNo`) there is no random test split:
each site is predicted by a model fitted on the other sites (threshold chosen on those), the
per-site table goes to metrics.json, MLflow (`loso.<site>.*`) and the model card, the pooled
out-of-site predictions stand in for the CV and test predictions, and the shipped model is
fitted on every site.

The config is in `risk_config`, the metrics in `risk_metrics`, the ONNX export in `risk_export`;
this file is `train_risk`, a list of steps, and re-exports the names other code imports from it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from diagnostics import __version__
from diagnostics.contract import ModelMetadata, Threshold
from diagnostics.models.risk import make_pipeline
from diagnostics.settings import get_settings
from diagnostics.tables import ValidatedTable, read_table, validate_records
from diagnostics.train import tracking
from diagnostics.train.calibrate import choose_threshold
from diagnostics.train.cards import risk_model_card
from diagnostics.train.plots import save_decision_curve, save_plots
from diagnostics.train.risk_config import (
    RiskModelConfig,
    RiskSplitConfig,
    RiskTrainConfig,
    load_risk_config,
)
from diagnostics.train.risk_export import (
    PARITY_TOLERANCE,
    RiskExport,
    export_checked,
    export_risk_onnx,
    onnx_feed,
    onnx_risk,
)
from diagnostics.train.risk_metrics import (
    MIN_SUBGROUP,
    decision_curve,
    full_report,
    leave_one_group_out,
    loso_metrics,
    odds_ratios,
    permutation_importance,
    subgroup_report,
)

__all__ = [
    "MIN_SUBGROUP",
    "PARITY_TOLERANCE",
    "RiskModelConfig",
    "RiskResult",
    "RiskSplitConfig",
    "RiskTrainConfig",
    "decision_curve",
    "export_risk_onnx",
    "full_report",
    "load_risk_config",
    "load_source",
    "onnx_feed",
    "onnx_risk",
    "subgroup_report",
    "train_risk",
]

log = logging.getLogger(__name__)


def load_source(table: str) -> pd.DataFrame:
    """A table from disk, or scikit-learn's bundled Wisconsin breast-cancer data (no network)."""
    if table == "sklearn:breast_cancer":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer(as_frame=True)
        df = data.frame.rename(columns=lambda c: c.replace(" ", "_"))
        df["malignant"] = (df.pop("target") == 0).astype(int)  # sklearn: 0 = malignant
        return df
    return read_table(table)


@dataclass
class RiskResult:
    run_dir: Path
    run_id: str | None
    onnx_path: Path
    sha256: str
    model_version: str | None
    cv: dict[str, float]
    test: dict[str, float]
    parity: float
    seconds: float
    table: ValidatedTable
    pipeline: Any  # the fitted sklearn Pipeline that the ONNX file reproduces


@dataclass
class RiskSplit:
    train: np.ndarray  # row indices of the training split
    test: np.ndarray  # row indices of the held-out test split
    folds: Any  # the cross-validation splitter over the training rows
    fold_groups: np.ndarray | None  # patient (or site) per training row: whole groups per fold
    loso: bool = False  # leave-one-group-out: train and test are every row, folds are groups


@dataclass
class FittedRisk:
    pipeline: Any  # fitted on the whole training split
    best_params: dict[str, Any]  # from the grid search, if any
    oof: np.ndarray  # out-of-fold probabilities on the training rows
    p_test: np.ndarray  # probabilities on the test rows
    loso: dict[str, Any] | None = None  # the leave-one-group-out report, when that split is used


@dataclass
class RiskEvaluation:
    threshold: float  # the operating point, chosen on the out-of-fold predictions
    cv: dict[str, Any]
    test: dict[str, Any]
    subgroups: dict[str, dict[str, dict[str, Any]]]
    curve: dict[str, list[float]]  # decision curve on the test rows
    importance: dict[str, float]
    odds: dict[str, dict[str, Any]] | None  # logistic models only
    plots: list[Path]
    flat: dict[str, float]  # finite "cv.*" and "test.*" metrics
    undefined: dict[str, str]  # tags saying why a metric (calibration slope) is missing
    loso: dict[str, Any] | None = None  # per group (site) out-of-group metrics


def train_risk(cfg: RiskTrainConfig, *, log_to_mlflow: bool = True) -> RiskResult:
    """Validate the table, split, fit, evaluate, export (with parity), report and track."""
    t0 = time.perf_counter()
    vt = load_table(cfg)
    run_dir = new_run_dir(cfg)
    split = split_rows(cfg, vt)
    fitted = fit_pipeline(cfg, vt, split)
    ev = evaluate_risk(cfg, vt, split, fitted, run_dir)
    digest = table_digest(cfg, vt, split)
    tracker = tracking.make_tracker(log_to_mlflow, cfg.tracking.experiment)
    with tracker.run(run_dir.name) as run_id:  # ends FAILED if anything raises
        meta = risk_metadata(cfg, ev, digest, run_id)
        x_test = vt.X.iloc[split.test]
        path = run_dir / "model.onnx"
        exported = export_checked(
            fitted.pipeline, cfg.table_schema, meta, path, x_test, fitted.p_test
        )
        write_reports(cfg, vt, ev, fitted, exported, run_dir)
        version = log_results(tracker, cfg, vt, ev, fitted, exported, digest, run_dir)
    return RiskResult(
        run_dir=run_dir,
        run_id=run_id,
        onnx_path=exported.onnx_path,
        sha256=exported.sha256,
        model_version=version,
        cv=ev.cv,
        test=ev.test,
        parity=exported.parity,
        seconds=time.perf_counter() - t0,
        table=vt,
        pipeline=fitted.pipeline,
    )


def load_table(cfg: RiskTrainConfig) -> ValidatedTable:
    """The table, validated against its schema (rejected rows counted with reasons)."""
    vt = validate_records(load_source(cfg.table), cfg.table_schema)
    log.info("table: %s", vt.summary().replace("\n", "; "))
    if len(vt.y) < 20 or len(np.unique(vt.y)) < 2:
        raise ValueError("fewer than 20 usable rows, or only one outcome class")
    return vt


def new_run_dir(cfg: RiskTrainConfig) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = get_settings().runs_dir / f"{cfg.name}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def split_rows(cfg: RiskTrainConfig, vt: ValidatedTable) -> RiskSplit:
    """A stratified held-out test split and CV folds; with patient (or site) keys, whole
    patients (or sites) stay on one side."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

    groups_key = vt.patient if vt.patient is not None else vt.site
    idx = np.arange(len(vt.y))
    seed = cfg.split.seed
    if cfg.split.strategy == "leave_one_group_out":
        from sklearn.model_selection import LeaveOneGroupOut

        by = split_groups(cfg, vt)
        if len(np.unique(by)) < 2:
            raise ValueError(f"leave-one-group-out by {cfg.split.group}: fewer than 2 groups")
        return RiskSplit(idx, idx, LeaveOneGroupOut(), by, loso=True)
    if groups_key is not None:
        # Whole patients (or sites) go to the test split: one fold of a grouped, stratified split.
        n_splits = max(2, round(1 / cfg.split.test_fraction))
        outer = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
        tr, te = next(outer.split(idx, vt.y, groups_key.to_numpy()))
        folds = StratifiedGroupKFold(cfg.split.cv_folds, shuffle=True, random_state=seed)
        return RiskSplit(tr, te, folds, groups_key.iloc[tr].to_numpy())
    tr, te = train_test_split(
        idx, test_size=cfg.split.test_fraction, random_state=seed, stratify=vt.y
    )
    return RiskSplit(
        tr, te, StratifiedKFold(cfg.split.cv_folds, shuffle=True, random_state=seed), None
    )


def split_groups(cfg: RiskTrainConfig, vt: ValidatedTable) -> np.ndarray:
    """The value of `split.group` per kept row (site, patient, or a subgroup's label)."""
    g, schema = cfg.split.group, cfg.table_schema
    if g is not None and g == schema.site_column and vt.site is not None:
        return vt.site.to_numpy().astype(str)
    if g is not None and g == schema.patient_column and vt.patient is not None:
        return vt.patient.to_numpy().astype(str)
    if g is not None and g in vt.groups.columns:
        return vt.groups[g].to_numpy().astype(str)
    raise ValueError(f"split.group {g!r}: no such column in the validated table")


def fit_pipeline(cfg: RiskTrainConfig, vt: ValidatedTable, split: RiskSplit) -> FittedRisk:
    """The calibrated pipeline (grid-searched if configured), its out-of-fold predictions on the
    training rows, then fitted on all of them and applied to the test rows."""
    from sklearn.model_selection import GridSearchCV, cross_val_predict

    schema, m = cfg.table_schema, cfg.model
    Xtr, ytr = vt.X.iloc[split.train], vt.y[split.train]
    kinds = {
        k: [f.name for f in schema.features if f.type == k]
        for k in ("numeric", "categorical", "binary")
    }
    pipe = make_pipeline(
        kinds["numeric"],
        kinds["categorical"],
        kinds["binary"],
        m.estimator,
        m.params,
        m.calibration,
        m.calibration_cv,
        cfg.split.seed,
        numeric_transform=m.numeric_transform,
    )
    best_params: dict[str, Any] = {}
    if m.search:
        grid = {f"model__estimator__{k}": v for k, v in m.search.items()}
        search = GridSearchCV(pipe, grid, scoring="roc_auc", cv=split.folds, n_jobs=1)
        search.fit(Xtr, ytr, groups=split.fold_groups)
        best_params = {k.split("__")[-1]: v for k, v in search.best_params_.items()}
        pipe = search.best_estimator_
    loso = None
    if split.loso:  # each group predicted by a model fitted on the others
        assert split.fold_groups is not None
        oof, loso = leave_one_group_out(
            pipe, Xtr, ytr, split.fold_groups, cfg.eval.threshold_policy
        )
    else:
        oof = cross_val_predict(
            pipe, Xtr, ytr, cv=split.folds, groups=split.fold_groups, method="predict_proba"
        )[:, 1]
    pipe.fit(Xtr, ytr)
    # loso: every row; these predictions of the shipped model are for the ONNX parity check only
    p_test = pipe.predict_proba(vt.X.iloc[split.test])[:, 1]
    return FittedRisk(pipe, best_params, oof, p_test, loso)


def evaluate_risk(
    cfg: RiskTrainConfig,
    vt: ValidatedTable,
    split: RiskSplit,
    fitted: FittedRisk,
    run_dir: Path,
) -> RiskEvaluation:
    """Threshold on the out-of-fold predictions; CV and test reports, subgroups, decision curve,
    importance, odds ratios, and the plots under run_dir/plots."""
    schema, seed = cfg.table_schema, cfg.split.seed
    ytr, yte, p_test = vt.y[split.train], vt.y[split.test], fitted.p_test
    if split.loso:  # no test split: judge the pooled out-of-group predictions
        p_test = fitted.oof
    Xte = vt.X.iloc[split.test]
    threshold = choose_threshold(ytr, fitted.oof, cfg.eval.threshold_policy)
    cv_report = full_report(ytr, fitted.oof, threshold, cfg.eval, seed)
    test_report = cv_report if split.loso else full_report(yte, p_test, threshold, cfg.eval, seed)
    groups = vt.groups.iloc[split.test].reset_index(drop=True)
    subgroups = subgroup_report(yte, p_test, groups, threshold)
    curve = decision_curve(yte, p_test, np.round(np.arange(0.05, 0.96, 0.05), 2))
    # loso: on the shipped model over all rows (its training data): apparent importance
    importance = permutation_importance(fitted.pipeline, Xte, yte, seed)
    # odds ratios mean something for a logistic model on linear features only
    linear = cfg.model.numeric_transform in ("linear", {"kind": "linear"})
    odds = (
        odds_ratios(fitted.pipeline, schema)
        if cfg.model.estimator == "logistic" and linear
        else None
    )
    safe_label = re.sub(r"[^A-Za-z0-9_.-]+", "_", schema.outcome.label)
    plots = save_plots(yte, p_test, f"test_{safe_label}", run_dir / "plots")
    plots.append(save_decision_curve(curve, run_dir / "plots", safe_label))
    flat = {f"cv.{k}": v for k, v in cv_report.items() if _finite(v)}
    flat |= {f"test.{k}": v for k, v in test_report.items() if _finite(v)}
    # an undefined calibration slope has no metric: a tag says why
    undefined = {
        f"{name}.calibration_slope": f"undefined: {r['calibration_note']}"
        for name, r in (("cv", cv_report), ("test", test_report))
        if r.get("calibration_note")
    }
    if fitted.loso is not None:
        flat |= loso_metrics(fitted.loso)
        undefined |= {
            f"loso.{g}.calibration_slope": f"undefined: {r['calibration_note']}"
            for g, r in fitted.loso["groups"].items()
            if r.get("calibration_note")
        }
    return RiskEvaluation(
        threshold,
        cv_report,
        test_report,
        subgroups,
        curve,
        importance,
        odds,
        plots,
        flat,
        undefined,
        fitted.loso,
    )


def table_digest(cfg: RiskTrainConfig, vt: ValidatedTable, split: RiskSplit) -> str:
    """sha256 over row numbers, outcome, split and features (tracking.dataset_digest)."""
    schema = cfg.table_schema
    frame = pd.DataFrame(
        {
            "image_id": np.arange(len(vt.y)).astype(str),
            schema.outcome.label: vt.y,
            "split": np.where(np.isin(np.arange(len(vt.y)), split.test), "test", "train"),
        }
    ).join(vt.X.astype(str))
    return tracking.dataset_digest(frame, [schema.outcome.label, *schema.feature_names])


def risk_metadata(
    cfg: RiskTrainConfig, ev: RiskEvaluation, digest: str, run_id: str | None
) -> ModelMetadata:
    """What the ONNX file says about itself, schema included (the clinic validates with it)."""
    schema, m = cfg.table_schema, cfg.model
    label = schema.outcome.label
    return ModelMetadata(
        task="risk",
        name=cfg.tracking.registered_model or cfg.name,
        architecture=f"{m.estimator}+{m.calibration}",
        labels=[label],
        temperature=[1.0],
        thresholds={
            label: Threshold(
                value=ev.threshold,
                policy=cfg.eval.threshold_policy,
                sensitivity=_f(ev.cv["sensitivity"]),
                specificity=_f(ev.cv["specificity"]),
            )
        },
        outputs=["label", "probabilities"],
        table_schema=schema.model_dump(mode="json"),
        run_id=run_id,
        dataset_digest=digest,
        dataset_name=f"{cfg.name}:{schema.name}",
        metrics=ev.flat,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        package_version=__version__,
        intended_use=cfg.intended_use,
        limitations=cfg.limitations,
    )


def write_reports(
    cfg: RiskTrainConfig,
    vt: ValidatedTable,
    ev: RiskEvaluation,
    fitted: FittedRisk,
    exported: RiskExport,
    run_dir: Path,
) -> None:
    """run_dir/metrics.json, schema.yaml and model_card.md."""
    doc = {
        "rows": {"read": vt.rows_read, "kept": len(vt.y), "rejected": len(vt.rejected)},
        "refusals": vt.refusals(),  # refusal code -> rows refused, never scored
        "problems": {f"{c}: {r}": n for (c, r), n in vt.problems.items()},
        "split": cfg.split.model_dump(),
        "cv": ev.cv,
        "test": ev.test,
        "threshold": ev.threshold,
        "best_params": fitted.best_params,
        "subgroups": ev.subgroups,
        "decision_curve": ev.curve,
        "permutation_importance": ev.importance,
        "odds_ratios": ev.odds,
        "onnx_parity_max_abs_diff": exported.parity,
        "sha256": exported.sha256,
    }
    if ev.loso is not None:
        doc["loso"] = ev.loso
    (run_dir / "metrics.json").write_text(json.dumps(doc, indent=2, default=_json_default))
    (run_dir / "schema.yaml").write_text(
        yaml.safe_dump(cfg.table_schema.model_dump(mode="json"), sort_keys=False)
    )
    (run_dir / "model_card.md").write_text(risk_model_card(cfg, vt, doc, exported.sha256))


def log_results(
    tracker: tracking.Tracker,
    cfg: RiskTrainConfig,
    vt: ValidatedTable,
    ev: RiskEvaluation,
    fitted: FittedRisk,
    exported: RiskExport,
    digest: str,
    run_dir: Path,
) -> str | None:
    """Params, tags, metrics, the dataset input, files and plots; log the ONNX model and
    register it if configured. Returns the registered version."""
    label = cfg.table_schema.outcome.label
    tracker.log_params(
        tracking.flatten(
            {
                "model": cfg.model.model_dump(mode="json"),
                "split": cfg.split.model_dump(),
                "eval": cfg.eval.model_dump(),
                "table": cfg.table,
                "best": fitted.best_params,
            }
        )
    )
    tracker.set_tags(
        tracking.standard_tags("cpu")
        | {"onnx_sha256": exported.sha256, "task": "risk", "split": cfg.split.strategy}
        | ev.undefined
    )
    refused = {f"refused.{code}": float(n) for code, n in vt.refusals().items()}
    tracker.log_metrics(ev.flat | refused | {"onnx_parity_max_abs_diff": exported.parity})
    frame = vt.X.assign(**{label: vt.y})
    tracker.log_dataset(frame, cfg.table_schema.name, digest, targets=label)
    for name in ("metrics.json", "schema.yaml", "model_card.md"):
        tracker.log_artifact(run_dir / name)
    for p in ev.plots:
        tracker.log_artifact(p, artifact_path="plots")
    return tracker.log_onnx_model(exported.onnx_path, None, cfg.tracking.registered_model)


def _f(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _finite(v: Any) -> bool:
    """A number worth logging as a metric (not a note, not NaN)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and bool(np.isfinite(v))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    return str(o)
