"""What a tabular risk model is judged by: discrimination with CIs, calibration, subgroups,
the decision curve (net benefit), permutation importance and odds ratios."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from diagnostics.tables import TableSchema
from diagnostics.train.config import EvalConfig
from diagnostics.train.metrics import bootstrap_ci, calibration_fields, finding_report

MIN_SUBGROUP = 30  # below this many patients (or 10 events) a subgroup is flagged as too small


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


def permutation_importance(
    pipe: Any, X: pd.DataFrame, y: np.ndarray, seed: int
) -> dict[str, float]:
    """Mean AUROC drop when each feature is shuffled (10 repeats), largest first."""
    from sklearn.inspection import permutation_importance as sk_permutation_importance

    r = sk_permutation_importance(pipe, X, y, scoring="roc_auc", n_repeats=10, random_state=seed)
    return {
        c: float(v)
        for c, v in sorted(zip(X.columns, r.importances_mean, strict=True), key=lambda t: -t[1])
    }


def odds_ratios(pipe: Any, schema: TableSchema) -> dict[str, dict[str, Any]]:
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
    num = (
        prep.named_transformers_["num"].named_steps.get("scale")
        if "num" in prep.named_transformers_
        else None
    )
    if num is not None:  # binned or spline features have no per-unit odds ratio
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


def leave_one_group_out(
    pipe: Any, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray, policy: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Leave-one-group-out (e.g. leave-one-site-out) evaluation.

    For each group: fit a clone of `pipe` on the other groups, choose the threshold on those
    training groups by `policy` (on the fitted model's own training-group predictions: no row of
    the held-out group is seen), and judge the held-out group at it. Returns the pooled
    out-of-group predictions (one per row) and the report: per group n, events, prevalence,
    AUROC, calibration slope / intercept (with a note when undefined), threshold, sensitivity and
    specificity; pooled out-of-group AUROC; and the spread across groups.
    """
    from sklearn.base import clone

    from diagnostics.train.calibrate import choose_threshold
    from diagnostics.train.metrics import at_threshold, auroc

    groups = np.asarray(groups).astype(str)
    oof = np.full(len(y), np.nan)
    per: dict[str, dict[str, Any]] = {}
    for g in sorted(np.unique(groups), key=_natural):
        te = groups == g
        model = clone(pipe).fit(X[~te], y[~te])
        p_tr = model.predict_proba(X[~te])[:, 1]
        p_te = model.predict_proba(X[te])[:, 1]
        oof[te] = p_te
        threshold = choose_threshold(y[~te], p_tr, policy)
        at = at_threshold(y[te], p_te, threshold)
        cal = calibration_fields(y[te], p_te)
        per[g] = {
            "n": int(te.sum()),
            "events": int(y[te].sum()),
            "prevalence": float(np.mean(y[te])),
            "auroc": auroc(y[te], p_te),
            "calibration_slope": cal["calibration_slope"],
            "calibration_intercept": cal["calibration_intercept"],
            "calibration_note": cal["calibration_note"],
            "threshold": float(threshold),
            "sensitivity": float(at["sensitivity"]),
            "specificity": float(at["specificity"]),
        }

    def spread(key: str) -> list[float]:
        vals = [float(r[key]) for r in per.values() if np.isfinite(r[key])]
        return [min(vals), max(vals)] if vals else [float("nan"), float("nan")]

    report = {
        "groups": per,
        "pooled_auroc": auroc(y, oof),
        "auroc_range": spread("auroc"),
        "calibration_slope_range": spread("calibration_slope"),
        "calibration_intercept_range": spread("calibration_intercept"),
        "sensitivity_range": spread("sensitivity"),
        "specificity_range": spread("specificity"),
    }
    return oof, report


def loso_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report as finite MLflow metrics: loso.<group>.<metric>, loso.pooled_auroc, ranges."""
    out: dict[str, float] = {}
    for g, r in report["groups"].items():
        for k, v in r.items():
            if isinstance(v, int | float) and np.isfinite(v):
                out[f"loso.{g}.{k}"] = float(v)
    if np.isfinite(report["pooled_auroc"]):
        out["loso.pooled_auroc"] = float(report["pooled_auroc"])
    for k in ("auroc", "calibration_slope"):
        lo, hi = report[f"{k}_range"]
        if np.isfinite(lo):
            out[f"loso.{k}_min"], out[f"loso.{k}_max"] = lo, hi
    return out


def _natural(value: str) -> tuple[int, float | str]:
    """Numeric group labels in numeric order ('2' before '10'), then the others."""
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)
