"""Classification metrics with bootstrap confidence intervals. Numpy only; NaN labels are skipped.

All functions take `y` (N,) in {0, 1} (NaN allowed: those rows are dropped) and `p` (N,)
probabilities. AUROC is the Mann-Whitney statistic, exact with ties.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata


def _known(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    keep = ~np.isnan(y)
    return y[keep], p[keep]


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    y, p = _known(y, p)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (step-wise area under the precision-recall curve)."""
    y, p = _known(y, p)
    if y.sum() == 0:
        return float("nan")
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, p))  # tied scores form one step, whatever the order


def bootstrap_ci(
    metric: Any, y: np.ndarray, p: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of `metric(y, p)` over `n` resamples of the rows; (nan, nan) if n == 0."""
    y, p = _known(y, p)
    if n == 0 or len(y) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        v = metric(y[idx], p[idx])
        if not np.isnan(v):
            values.append(v)
    if not values:
        return (float("nan"), float("nan"))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, PPV and NPV when `p >= threshold` is called positive."""
    y, p = _known(y, p)
    pred = p >= threshold
    tp = float((pred & (y == 1)).sum())
    fp = float((pred & (y == 0)).sum())
    fn = float((~pred & (y == 1)).sum())
    tn = float((~pred & (y == 0)).sum())

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
    }


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: bin-weighted |mean predicted - observed rate|, equal bins."""
    y, p = _known(y, p)
    if len(y) == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() / len(y) * abs(p[m].mean() - y[m].mean())
    return float(total)


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Per-bin mean predicted probability, observed rate and count (for reliability diagrams)."""
    y, p = _known(y, p)
    which = np.minimum((p * bins).astype(int), bins - 1)
    out: dict[str, list[float]] = {"predicted": [], "observed": [], "count": []}
    for b in range(bins):
        m = which == b
        if m.any():
            out["predicted"].append(float(p[m].mean()))
            out["observed"].append(float(y[m].mean()))
            out["count"].append(float(m.sum()))
    return out


def brier(y: np.ndarray, p: np.ndarray) -> float:
    y, p = _known(y, p)
    return float(np.mean((p - y) ** 2)) if len(y) else float("nan")


def finding_report(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ece_bins: int = 10,
) -> dict[str, float]:
    """Every headline metric of one finding, flat: auroc, auroc_lo, auroc_hi, auprc, ..."""
    yk, pk = _known(y, p)
    lo, hi = bootstrap_ci(auroc, yk, pk, n=n_boot, seed=seed)
    report = {
        "n": float(len(yk)),
        "positives": float(yk.sum()),
        "auroc": auroc(yk, pk),
        "auroc_lo": lo,
        "auroc_hi": hi,
        "auprc": auprc(yk, pk),
        "threshold": float(threshold),
        "ece": ece(yk, pk, ece_bins),
        "brier": brier(yk, pk),
    }
    report.update(at_threshold(yk, pk, threshold))
    return report


def mean_auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean AUROC over findings (columns) that have both classes; NaN if none has."""
    values = [auroc(labels[:, i], probs[:, i]) for i in range(labels.shape[1])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
