"""Agreement and calibration per site, from the outcomes clinicians record for risk records.

Numpy only (the clinic install has no scipy or scikit-learn). Per clinic, model file and site
profile (records judged differently are never pooled): how many
scored records have a confirmed outcome, how often the category (high / low) agreed with it,
sensitivity and specificity at the threshold each record was scored with, AUROC (Mann-Whitney,
exact with ties), and the calibration intercept (calibration-in-the-large: the shift of the
logit that makes the mean risk match the outcome rate) and slope (logistic regression of the
outcome on the logit). A figure that needs both classes, or more records, is None with a reason.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, TypedDict

import numpy as np

CLIP = 1e-6
MIN_FOR_CALIBRATION = 20  # records with an outcome before a slope or intercept means anything


class SiteAgreement(TypedDict):
    clinic: str
    model: str
    model_sha256: str  # one model file: a new champion starts a new row
    profile_id: int | None  # the site profile the records were judged with (None: the model's)
    n: int  # scored records with a confirmed or ruled-out outcome
    positives: int
    agreement: float  # share where the category matched the outcome
    sensitivity: float | None
    specificity: float | None
    auroc: float | None
    calibration_intercept: float | None
    calibration_slope: float | None
    mean_risk: float
    outcome_rate: float
    note: str | None  # why a figure is missing


def auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    pos, neg = p[y == 1], p[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    sorted_p = p[order]
    i = 0
    while i < len(p):  # average ranks over ties
        j = i
        while j + 1 < len(p) and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[y == 1].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, CLIP, 1 - CLIP)
    return np.log(q) - np.log1p(-q)


def calibration_intercept(y: np.ndarray, p: np.ndarray) -> float:
    """a with sum(y - sigmoid(a + logit p)) = 0, by bisection (monotone in a)."""
    x = _logit(p)
    lo, hi = -50.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.sum(y - 1 / (1 + np.exp(-(mid + x)))) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def calibration_slope(y: np.ndarray, p: np.ndarray) -> float | None:
    """b of y ~ sigmoid(a + b logit p), by Newton's method; None if it does not converge
    (classes separated perfectly, a constant score)."""
    x = _logit(p)
    X = np.column_stack([np.ones_like(x), x])
    beta = np.array([0.0, 1.0])
    for _ in range(100):
        mu = 1 / (1 + np.exp(-np.clip(X @ beta, -500, 500)))
        w = mu * (1 - mu)
        hess = X.T @ (X * w[:, None])
        try:
            step = np.linalg.solve(hess, X.T @ (y - mu))
        except np.linalg.LinAlgError:
            return None
        beta = beta + step
        if not np.isfinite(beta).all() or abs(beta[1]) > 1e3:
            return None
        if np.abs(step).max() < 1e-10:
            return float(beta[1])
    return None


def site_agreement(pairs: list[tuple[Any, ...]]) -> list[SiteAgreement]:
    """`pairs` from `Store.risk_outcome_pairs`: (clinic, model, sha256, probability,
    raw_probability, outcome, category, profile_id). One row per clinic, model file and site
    profile: records judged by another file, or with another recalibration, are not pooled."""
    Key = tuple[str, str, str, int]  # profile -1: none (sortable)
    groups: dict[Key, list[tuple[float, bool, str | None]]] = defaultdict(list)
    for clinic, model, sha, prob, _raw, outcome, category, profile in pairs:
        key = (clinic, model, sha, -1 if profile is None else int(profile))
        groups[key].append((float(prob), bool(outcome), category))
    rows: list[SiteAgreement] = []
    for (clinic, model, sha, profile), items in sorted(groups.items()):
        p = np.array([i[0] for i in items])
        y = np.array([1.0 if i[1] else 0.0 for i in items])
        high = np.array([i[2] == "high" for i in items])
        pos, neg = y == 1, y == 0
        notes = []
        both = bool(pos.any() and neg.any())
        if not both:
            notes.append("one outcome class only: no AUROC or calibration")
        elif len(y) < MIN_FOR_CALIBRATION:
            notes.append(f"fewer than {MIN_FOR_CALIBRATION} outcomes: no calibration yet")
        calibrated = both and len(y) >= MIN_FOR_CALIBRATION
        slope = calibration_slope(y, p) if calibrated else None
        if calibrated and slope is None:
            notes.append("calibration slope undefined (classes separated)")
        rows.append(
            {
                "clinic": clinic,
                "model": model,
                "model_sha256": sha,
                "profile_id": None if profile < 0 else profile,
                "n": len(y),
                "positives": int(pos.sum()),
                "agreement": float((high == pos).mean()),
                "sensitivity": float(high[pos].mean()) if pos.any() else None,
                "specificity": float((~high[neg]).mean()) if neg.any() else None,
                "auroc": auroc(y, p) if both else None,
                "calibration_intercept": calibration_intercept(y, p) if calibrated else None,
                "calibration_slope": slope,
                "mean_risk": float(p.mean()),
                "outcome_rate": float(y.mean()),
                "note": "; ".join(notes) or None,
            }
        )
    return rows
