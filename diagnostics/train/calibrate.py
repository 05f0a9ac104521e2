"""Temperature scaling and operating-point selection, fitted on the validation split.

Temperature scaling (Guo et al. 2017) divides a finding's logit by T > 0 fitted to minimise the
validation log loss. It changes calibration, never the ranking, so AUROC is unchanged.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from diagnostics.contract import calibrated_probability
from diagnostics.train.metrics import at_threshold


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The uncalibrated probability of raw logits (temperature 1)."""
    return calibrated_probability(x, 1.0)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """T minimising the binary log loss of sigmoid(logits / T); 1.0 if there is nothing to fit."""
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = ~np.isnan(y)
    z, t = logits[keep], y[keep]
    if len(t) < 2 or t.min() == t.max():
        return 1.0

    def nll(log_temp: float) -> float:
        q = calibrated_probability(z, np.exp(log_temp))
        q = np.clip(q, 1e-12, 1 - 1e-12)
        return float(-np.mean(t * np.log(q) + (1 - t) * np.log(1 - q)))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def choose_threshold(y: np.ndarray, p: np.ndarray, policy: str) -> float:
    """The operating threshold on probability `p` for one finding.

    - `youden`: maximises sensitivity + specificity - 1.
    - `sensitivity>=x`: the highest threshold whose sensitivity is at least x (the most specific
      such point).
    - `specificity>=x`: the lowest threshold whose specificity is at least x.
    Candidate thresholds lie midway between consecutive distinct scores, so a threshold never
    sits on a validation score and ties resolve to the middle of the gap.
    Falls back to 0.5 when the validation split has only one class.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    if len(y) == 0 or y.min() == y.max():
        return 0.5
    u = np.unique(p)
    # high to low: sensitivity rises, specificity falls
    candidates = np.concatenate([[np.nextafter(u[-1], np.inf)], (u[:-1] + u[1:]) / 2, [u[0]]])[::-1]
    candidates = np.clip(np.sort(candidates)[::-1], 0.0, 1.0)
    stats = [at_threshold(y, p, float(c)) for c in candidates]
    sens = np.array([s["sensitivity"] for s in stats])
    spec = np.array([s["specificity"] for s in stats])
    if policy == "youden":
        return float(candidates[int(np.argmax(sens + spec - 1))])
    kind, value = policy.split(">=")
    target = float(value)
    if kind == "sensitivity":
        ok = np.flatnonzero(sens >= target)
        return float(candidates[ok[0]]) if len(ok) else float(candidates[-1])
    ok = np.flatnonzero(spec >= target)
    return float(candidates[ok[-1]]) if len(ok) else float(candidates[0])
