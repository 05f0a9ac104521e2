"""Classification metrics with bootstrap confidence intervals. Numpy only; NaN labels are skipped.

All functions take `y` (N,) in {0, 1} (NaN allowed: those rows are dropped) and `p` (N,)
probabilities. AUROC is the Mann-Whitney statistic, exact with ties.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    from diagnostics.contract import is_positive

    y, p = _known(y, p)
    pred = is_positive(p, threshold)
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


# p is clipped to [CLIP, 1 - CLIP] before its logit is taken, so logits stay finite (+-27.6)
CALIBRATION_CLIP = 1e-12


@dataclass(frozen=True)
class CalibrationFit:
    """Logistic recalibration of the label on logit(p) (Cox 1958).

    - `slope`: b in logit P(y=1) = a + b logit(p), fitted by maximum likelihood. 1 is ideal,
      < 1 overconfident (probabilities too extreme), > 1 underconfident.
    - `intercept`: calibration-in-the-large, a in logit P(y=1) = a + logit(p) (the slope held
      at 1): 0 is ideal, > 0 the model predicts too low on average.
    - `reason`: why the slope is undefined (then `slope` is NaN), in words; None when defined.
    """

    slope: float
    intercept: float
    reason: str | None = None

    @property
    def defined(self) -> bool:
        return self.reason is None


def calibration_fit(y: np.ndarray, p: np.ndarray) -> CalibrationFit:
    """Calibration slope and intercept of probabilities `p` for labels `y` (NaN labels skipped).

    The slope is fitted with scikit-learn's unpenalised LogisticRegression on logit(p), p
    clipped to [1e-12, 1 - 1e-12]. Where its maximum-likelihood value does not exist it is NaN
    with the reason, never a huge number: one class only, a constant score, or classes that
    the score separates perfectly (every positive scored at or above every negative, or the
    reverse: the likelihood keeps rising as the slope grows without bound).
    """
    y, p = _known(y, p)
    nan = float("nan")
    if len(y) == 0:
        return CalibrationFit(nan, nan, "no rows with a known label")
    if not np.isfinite(p).all():
        return CalibrationFit(nan, nan, "some probabilities are not finite")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        which = "positive" if n_pos else "negative"
        return CalibrationFit(nan, nan, f"only one class (every row {which})")
    q = np.clip(p, CALIBRATION_CLIP, 1 - CALIBRATION_CLIP)
    x = np.log(q) - np.log1p(-q)  # (N,) logit(p), finite
    intercept = _calibration_in_the_large(y, x)
    if x.min() == x.max():
        return CalibrationFit(nan, intercept, "the probability is the same for every row")
    pos, neg = x[y == 1], x[y == 0]
    if neg.max() <= pos.min() or pos.max() <= neg.min():
        return CalibrationFit(
            nan,
            intercept,
            "the score separates the classes perfectly (no maximum-likelihood slope)",
        )
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():  # near-separated data may stop short: the fit is checked
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = LogisticRegression(
            **_unpenalised(), solver="newton-cholesky", tol=1e-10, max_iter=500
        ).fit(x[:, None], y.astype(int))
    slope = float(fit.coef_[0, 0])
    if not np.isfinite(slope):
        return CalibrationFit(nan, intercept, "the logistic fit did not converge")
    return CalibrationFit(slope, intercept)


def _unpenalised() -> dict[str, Any]:
    """LogisticRegression without a penalty: `penalty=None` before scikit-learn 1.8, which
    deprecates it for `C=inf`."""
    import sklearn

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    return {"C": np.inf} if (major, minor) >= (1, 8) else {"penalty": None}


def _calibration_in_the_large(y: np.ndarray, x: np.ndarray) -> float:
    """a solving sum(y - sigmoid(a + x)) = 0: the score equation is monotone in a, and has a
    root whenever both classes are present (x finite)."""
    from scipy.optimize import brentq

    def score(a: float) -> float:
        return float(np.sum(y - 1.0 / (1.0 + np.exp(-np.clip(a + x, -700, 700)))))

    span = float(np.abs(x).max()) + 50.0  # sigmoid(+-50 beyond any logit) is 0 or 1 in effect
    return float(brentq(score, -span, span, xtol=1e-12))


def calibration_fields(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """`calibration_fit` as report fields: calibration_slope, calibration_intercept (NaN where
    undefined) and calibration_note (why the slope is undefined; None when it is defined)."""
    fit = calibration_fit(y, p)
    return {
        "calibration_slope": fit.slope,
        "calibration_intercept": fit.intercept,
        "calibration_note": fit.reason,
    }


def calibration_text(value: float | None, reason: str | None = None, digits: int = 2) -> str:
    """A slope or intercept for people: the number, or "undefined (why)"."""
    if value is None or not np.isfinite(value):
        return f"undefined ({reason})" if reason else "undefined"
    return f"{value:.{digits}f}"


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
