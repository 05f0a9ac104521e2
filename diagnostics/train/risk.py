"""`diagnostics train risk`: a calibrated tabular risk model, its governance metrics, MLflow, ONNX.

Out-of-fold (cross-validated) predictions on the training split choose the operating threshold
and give the CV metrics; the held-out test split gives the test metrics, subgroups, decision
curve, permutation importance and the ONNX parity check.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diagnostics import __version__
from diagnostics.configio import ConfigError, apply_overrides, load_yaml, validation_lines
from diagnostics.contract import METADATA_KEY, ModelMetadata, Threshold
from diagnostics.models.risk import make_pipeline
from diagnostics.settings import get_settings
from diagnostics.tables import TableSchema, ValidatedTable, read_table, validate_records
from diagnostics.train import tracking
from diagnostics.train.calibrate import choose_threshold
from diagnostics.train.cards import risk_model_card
from diagnostics.train.config import EvalConfig, TrackingConfig
from diagnostics.train.metrics import bootstrap_ci, calibration_fields, finding_report

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-5
MIN_SUBGROUP = 30  # below this many patients (or 10 events) a subgroup is flagged as too small


class RiskModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    estimator: Literal["logistic", "hist_gradient_boosting", "random_forest"] = "logistic"
    params: dict[str, Any] = Field(default_factory=dict)
    calibration: Literal["sigmoid", "isotonic"] = "sigmoid"
    calibration_cv: int = Field(5, ge=2)
    search: dict[str, list[Any]] | None = Field(
        None, description="optional grid over estimator params, e.g. {C: [0.1, 1, 10]}"
    )


class RiskSplitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    test_fraction: float = Field(0.25, gt=0, lt=1)
    cv_folds: int = Field(5, ge=2)
    seed: int = 0


class RiskTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    table: str = Field(description="CSV/Parquet path, or sklearn:breast_cancer (bundled)")
    table_schema: TableSchema = Field(alias="schema")
    model: RiskModelConfig = Field(default_factory=RiskModelConfig)
    split: RiskSplitConfig = Field(default_factory=RiskSplitConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="risk"))
    intended_use: str = "Research use: decision support. Not a diagnosis."
    limitations: str = ""


def load_risk_config(path: str | Path, overrides: list[str] | None = None) -> RiskTrainConfig:
    raw = apply_overrides(load_yaml(path), overrides or [])
    try:
        return RiskTrainConfig.model_validate(raw)
    except ValidationError as exc:
        where = f"{path} with --set overrides" if overrides else str(path)
        raise ConfigError(f"{where}: invalid risk config:\n{validation_lines(exc)}") from None


def load_source(table: str) -> pd.DataFrame:
    """A table from disk, or scikit-learn's bundled Wisconsin breast-cancer data (no network)."""
    if table == "sklearn:breast_cancer":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer(as_frame=True)
        df = data.frame.rename(columns=lambda c: c.replace(" ", "_"))
        df["malignant"] = (df.pop("target") == 0).astype(int)  # sklearn: 0 = malignant
        return df
    return read_table(table)


# --------------------------------------------------------------------------- metrics


def decision_curve(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> dict[str, list[float]]:
    """Net benefit of the model, treat-all and treat-none at each threshold probability."""
    n, prev = len(y), float(np.mean(y))
    model, treat_all = [], []
    for t in thresholds:
        w = t / (1 - t)
        pos = p >= t
        tp = float(np.sum(pos & (y == 1))) / n
        fp = float(np.sum(pos & (y == 0))) / n
        model.append(tp - fp * w)
        treat_all.append(prev - (1 - prev) * w)
    return {
        "threshold": [float(t) for t in thresholds],
        "model": model,
        "treat_all": treat_all,
        "treat_none": [0.0] * len(thresholds),
    }


def full_report(y: np.ndarray, p: np.ndarray, threshold: float, ev: EvalConfig, seed: int) -> dict:
    r = finding_report(y, p, threshold, n_boot=ev.bootstrap, seed=seed, ece_bins=ev.ece_bins)
    from diagnostics.train.metrics import auprc

    r["auprc_lo"], r["auprc_hi"] = bootstrap_ci(auprc, y, p, n=ev.bootstrap, seed=seed)
    r.update(calibration_fields(y, p))  # slope NaN with calibration_note where undefined
    return r


def subgroup_report(
    y: np.ndarray, p: np.ndarray, groups: pd.DataFrame, threshold: float
) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in groups.columns:
        out[name] = {}
        for value in sorted(groups[name].unique()):
            m = (groups[name] == value).to_numpy()
            yy, pp = y[m], p[m]
            r = finding_report(yy, pp, threshold, n_boot=0)
            small = m.sum() < MIN_SUBGROUP or yy.sum() < 10 or (len(yy) - yy.sum()) < 10
            out[name][str(value)] = {
                "n": int(m.sum()),
                "events": int(yy.sum()),
                "auroc": r["auroc"],
                "sensitivity": r["sensitivity"],
                "specificity": r["specificity"],
                "ece": r["ece"],
                "too_small_to_judge": bool(small),
            }
    return out


# --------------------------------------------------------------------------- export


def export_risk_onnx(pipeline: Any, schema: TableSchema, meta: ModelMetadata, path: Path) -> Path:
    """skl2onnx export with one named input per feature; metadata embedded."""
    import onnx
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    inputs = [
        (
            f.name,
            StringTensorType([None, 1]) if f.type == "categorical" else FloatTensorType([None, 1]),
        )
        for f in schema.features
    ]
    try:
        proto = to_onnx(
            pipeline,
            initial_types=inputs,
            target_opset={"": 17, "ai.onnx.ml": 3},
            options={id(pipeline.steps[-1][1]): {"zipmap": False}},
        )
    except Exception as exc:  # skl2onnx dumps whole tree tables into its messages: keep the start
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise RuntimeError(
            f"{meta.architecture} cannot be converted to ONNX ({first}...); no file is shipped. "
            "Use estimator: logistic with calibration: sigmoid, which converts exactly."
        ) from exc
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def onnx_feed(X: pd.DataFrame, schema: TableSchema) -> dict[str, np.ndarray]:
    """Records -> one (N, 1) array per named input (strings for categorical features)."""
    feed = {}
    for f in schema.features:
        col = X[f.name]
        if f.type == "categorical":
            feed[f.name] = col.astype(object).where(col.notna(), "").astype(str).to_numpy()[:, None]
            feed[f.name] = feed[f.name].astype(object)
        else:
            feed[f.name] = col.astype(np.float32).to_numpy()[:, None]
    return feed


def onnx_risk(path: Path, X: pd.DataFrame, schema: TableSchema) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, onnx_feed(X, schema))
    return np.asarray(out[1], dtype=np.float64)[:, 1]


# --------------------------------------------------------------------------- run


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


def train_risk(cfg: RiskTrainConfig, *, log_to_mlflow: bool = True) -> RiskResult:
    from sklearn.model_selection import (
        GridSearchCV,
        StratifiedGroupKFold,
        StratifiedKFold,
        cross_val_predict,
        train_test_split,
    )

    t0 = time.perf_counter()
    settings = get_settings()
    schema = cfg.table_schema
    vt = validate_records(load_source(cfg.table), schema)
    log.info("table: %s", vt.summary().replace("\n", "; "))
    if len(vt.y) < 20 or len(np.unique(vt.y)) < 2:
        raise ValueError("fewer than 20 usable rows, or only one outcome class")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = settings.runs_dir / f"{cfg.name}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)

    groups_key = vt.patient if vt.patient is not None else vt.site
    idx = np.arange(len(vt.y))
    if groups_key is not None:
        # Whole patients (or sites) go to the test split: one fold of a grouped, stratified split.
        n_splits = max(2, round(1 / cfg.split.test_fraction))
        outer = StratifiedGroupKFold(n_splits, shuffle=True, random_state=cfg.split.seed)
        tr, te = next(outer.split(idx, vt.y, groups_key.to_numpy()))
    else:
        tr, te = train_test_split(
            idx, test_size=cfg.split.test_fraction, random_state=cfg.split.seed, stratify=vt.y
        )
    Xtr, Xte, ytr, yte = vt.X.iloc[tr], vt.X.iloc[te], vt.y[tr], vt.y[te]
    if groups_key is not None:
        folds = StratifiedGroupKFold(cfg.split.cv_folds, shuffle=True, random_state=cfg.split.seed)
        fold_groups = groups_key.iloc[tr].to_numpy()
    else:
        folds = StratifiedKFold(cfg.split.cv_folds, shuffle=True, random_state=cfg.split.seed)
        fold_groups = None

    kinds = {
        k: [f.name for f in schema.features if f.type == k]
        for k in ("numeric", "categorical", "binary")
    }
    m = cfg.model
    pipe = make_pipeline(
        kinds["numeric"],
        kinds["categorical"],
        kinds["binary"],
        m.estimator,
        m.params,
        m.calibration,
        m.calibration_cv,
        cfg.split.seed,
    )
    best_params: dict[str, Any] = {}
    if m.search:
        grid = {f"model__estimator__{k}": v for k, v in m.search.items()}
        search = GridSearchCV(pipe, grid, scoring="roc_auc", cv=folds, n_jobs=1)
        search.fit(Xtr, ytr, groups=fold_groups)
        best_params = {k.split("__")[-1]: v for k, v in search.best_params_.items()}
        pipe = search.best_estimator_
    oof = cross_val_predict(pipe, Xtr, ytr, cv=folds, groups=fold_groups, method="predict_proba")[
        :, 1
    ]
    pipe.fit(Xtr, ytr)
    p_test = pipe.predict_proba(Xte)[:, 1]
    threshold = choose_threshold(ytr, oof, cfg.eval.threshold_policy)
    cv_report = full_report(ytr, oof, threshold, cfg.eval, cfg.split.seed)
    test_report = full_report(yte, p_test, threshold, cfg.eval, cfg.split.seed)
    subgroups = subgroup_report(yte, p_test, vt.groups.iloc[te].reset_index(drop=True), threshold)
    curve = decision_curve(yte, p_test, np.round(np.arange(0.05, 0.96, 0.05), 2))
    importance = _importance(pipe, Xte, yte, cfg.split.seed)
    odds = _odds_ratios(pipe, schema) if m.estimator == "logistic" else None
    safe_label = re.sub(r"[^A-Za-z0-9_.-]+", "_", schema.outcome.label)
    plots = _plots(yte, p_test, curve, run_dir / "plots", safe_label)

    digest = tracking.dataset_digest(
        pd.DataFrame(
            {
                "image_id": np.arange(len(vt.y)).astype(str),
                schema.outcome.label: vt.y,
                "split": np.where(np.isin(idx, te), "test", "train"),
            }
        ).join(vt.X.astype(str)),
        [schema.outcome.label, *schema.feature_names],
    )
    label = schema.outcome.label
    flat = {f"cv.{k}": v for k, v in cv_report.items() if _finite(v)}
    flat |= {f"test.{k}": v for k, v in test_report.items() if _finite(v)}
    # an undefined calibration slope has no metric: a tag says why
    undefined = {
        f"{split}.calibration_slope": f"undefined: {r['calibration_note']}"
        for split, r in (("cv", cv_report), ("test", test_report))
        if r.get("calibration_note")
    }
    meta = ModelMetadata(
        task="risk",
        name=cfg.tracking.registered_model or cfg.name,
        architecture=f"{m.estimator}+{m.calibration}",
        labels=[label],
        temperature=[1.0],
        thresholds={
            label: Threshold(
                value=threshold,
                policy=cfg.eval.threshold_policy,
                sensitivity=_f(cv_report["sensitivity"]),
                specificity=_f(cv_report["specificity"]),
            )
        },
        outputs=["label", "probabilities"],
        table_schema=schema.model_dump(mode="json"),
        dataset_digest=digest,
        dataset_name=f"{cfg.name}:{schema.name}",
        metrics=flat,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        package_version=__version__,
        intended_use=cfg.intended_use,
        limitations=cfg.limitations,
    )

    mlflow = None
    run_id = None
    status = "FAILED"
    if log_to_mlflow:
        import mlflow

        exp = tracking.setup(settings.mlflow_uri(), cfg.tracking.experiment, settings.artifact_root)
        mlflow.start_run(experiment_id=exp, run_name=run_dir.name)
        run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]
        meta = meta.model_copy(update={"run_id": run_id})
    try:
        onnx_path = export_risk_onnx(pipe, schema, meta, run_dir / "model.onnx")
        p_onnx = onnx_risk(onnx_path, Xte, schema)
        parity = float(np.abs(p_onnx - p_test).max())
        if not parity <= PARITY_TOLERANCE:
            onnx_path.unlink()
            raise RuntimeError(
                f"ONNX and sklearn disagree by {parity:.2e} (> {PARITY_TOLERANCE:.0e}): "
                "not shipped. "
                "Isotonic calibration and some estimators do not convert exactly: use "
                "estimator: logistic with calibration: sigmoid."
            )
        from diagnostics.contract import file_sha256

        sha = file_sha256(onnx_path)
        doc = {
            "rows": {"read": vt.rows_read, "kept": len(vt.y), "rejected": len(vt.rejected)},
            "problems": {f"{c}: {r}": n for (c, r), n in vt.problems.items()},
            "cv": cv_report,
            "test": test_report,
            "threshold": threshold,
            "best_params": best_params,
            "subgroups": subgroups,
            "decision_curve": curve,
            "permutation_importance": importance,
            "odds_ratios": odds,
            "onnx_parity_max_abs_diff": parity,
            "sha256": sha,
        }
        (run_dir / "metrics.json").write_text(json.dumps(doc, indent=2, default=_json_default))
        (run_dir / "schema.yaml").write_text(
            yaml.safe_dump(schema.model_dump(mode="json"), sort_keys=False)
        )
        (run_dir / "model_card.md").write_text(risk_model_card(cfg, vt, doc, sha))
        version = None
        if mlflow is not None:
            mlflow.log_params(
                tracking.flatten(
                    {
                        "model": m.model_dump(mode="json"),
                        "split": cfg.split.model_dump(),
                        "eval": cfg.eval.model_dump(),
                        "table": cfg.table,
                        "best": best_params,
                    }
                )
            )
            mlflow.set_tags(
                tracking.standard_tags("cpu") | {"onnx_sha256": sha, "task": "risk"} | undefined
            )
            mlflow.log_metrics(flat | {"onnx_parity_max_abs_diff": parity})
            ds = mlflow.data.from_pandas(
                vt.X.assign(**{label: vt.y}), name=schema.name, targets=label, digest=digest[:32]
            )
            mlflow.log_input(ds, context="training")
            for name in ("metrics.json", "schema.yaml", "model_card.md"):
                mlflow.log_artifact(str(run_dir / name))
            for p in plots:
                mlflow.log_artifact(str(p), artifact_path="plots")
            _, version = tracking.log_onnx_model(onnx_path, None, cfg.tracking.registered_model)
        status = "FINISHED"
    finally:
        if mlflow is not None:
            mlflow.end_run(status=status)
    return RiskResult(
        run_dir=run_dir,
        run_id=run_id,
        onnx_path=onnx_path,
        sha256=sha,
        model_version=version,
        cv=cv_report,
        test=test_report,
        parity=parity,
        seconds=time.perf_counter() - t0,
        table=vt,
        pipeline=pipe,
    )


def _f(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _finite(v: Any) -> bool:
    """A number worth logging as a metric (not a note, not NaN)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and bool(np.isfinite(v))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    return str(o)


def _importance(pipe: Any, X: pd.DataFrame, y: np.ndarray, seed: int) -> dict[str, float]:
    from sklearn.inspection import permutation_importance

    r = permutation_importance(pipe, X, y, scoring="roc_auc", n_repeats=10, random_state=seed)
    return {
        c: float(v)
        for c, v in sorted(zip(X.columns, r.importances_mean, strict=True), key=lambda t: -t[1])
    }


def _odds_ratios(pipe: Any, schema: TableSchema) -> dict[str, dict[str, Any]]:
    """Odds ratios of the shipped (calibrated) model, per model input.

    The sigmoid calibrator maps the logistic model's logit f to 1 / (1 + exp(a f + b)), so the
    shipped log-odds change per unit of f is -a: coefficients are scaled by it. Numeric features
    are standardised inside the pipeline: the ratio is given per stated unit (coefficient / SD)
    and per SD. One-hot categories have no reference level: each ratio is against the average.
    """
    prep = pipe.named_steps["prep"]
    names = list(prep.get_feature_names_out())
    fitted = pipe.named_steps["model"].calibrated_classifiers_
    coefs = np.mean(
        [
            c.estimator.coef_[0]
            * (-float(c.calibrators[0].a_) if hasattr(c.calibrators[0], "a_") else 1.0)
            for c in fitted
        ],
        axis=0,
    )
    units = {f.name: f.unit for f in schema.features}
    scale = {}
    if "num" in prep.named_transformers_:
        num = prep.named_transformers_["num"].named_steps["scale"]
        columns = next(cols for name, _, cols in prep.transformers_ if name == "num")
        scale = dict(zip(columns, num.scale_, strict=True))
    out = {}
    for name, c in zip(names, coefs, strict=True):
        base = name.split("__", 1)[-1]
        entry: dict[str, Any] = {"coefficient": float(c)}
        if base in scale:
            entry["odds_ratio_per_sd"] = float(np.exp(c))
            entry["odds_ratio_per_unit"] = float(np.exp(c / scale[base]))
            entry["unit"] = units.get(base, "")
            entry["sd"] = float(scale[base])
        else:
            entry["odds_ratio_vs_average"] = float(np.exp(c))
        out[base] = entry
    return out


def _plots(y: np.ndarray, p: np.ndarray, curve: dict, out: Path, label: str) -> list[Path]:
    from diagnostics.train.plots import _figure, save_plots

    paths = save_plots(y, p, f"test_{label}", out)
    fig, ax = _figure()
    ax.plot(curve["threshold"], curve["model"], label="model", lw=1.5)
    ax.plot(curve["threshold"], curve["treat_all"], label="treat all", ls="--")
    ax.plot(curve["threshold"], curve["treat_none"], label="treat none", ls=":")
    ax.set(xlabel="threshold probability", ylabel="net benefit", title=f"Decision curve: {label}")
    ax.set_ylim(min(-0.05, min(curve["model"])), max(0.05, max(curve["treat_all"]) * 1.1))
    ax.legend()
    paths.append(out / f"decision_curve_{label}.png")
    fig.savefig(paths[-1], bbox_inches="tight")
    return paths
