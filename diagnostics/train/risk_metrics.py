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
