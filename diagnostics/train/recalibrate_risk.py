"""Per-site recalibration of a risk model from the site's own labelled rows.

A risk model's probability p is mapped, for one site, to p' = sigmoid(logit(p) / T + b)
(`serve.risk.recalibrate_probability`): logistic recalibration (Cox 1958), y ~ a logit(p) + b
fitted by unpenalised maximum likelihood on the site's rows, with T = 1 / a. The site's
threshold is then re-chosen on p' by the policy (the model's own by default). Stored, like an
image model's, as a site profile tied to the model's sha256 (`temperatures`, `intercepts`,
`thresholds`); the ONNX file is unchanged.

The map is monotone, so the ranking (AUROC) at the site does not change: what changes is
calibration (the probability a clinician reads) and the operating point. Evidence is measured
on the rows the map was fitted on; judge it on other rows of the site before relying on it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diagnostics.serve.risk import RECAL_CLIP, RiskModel, recalibrate_probability
from diagnostics.tables import read_table, validate_records
from diagnostics.train.calibrate import choose_threshold
from diagnostics.train.metrics import at_threshold, calibration_fields
from diagnostics.train.recalibrate import SampleTooSmall

_POLICY = re.compile(r"^(youden|(sensitivity|specificity)>=(0(\.\d+)?|1(\.0+)?))$")

__all__ = [
    "SampleTooSmall",
    "fit_logistic_recalibration",
    "fit_risk_recalibration",
    "recalibrate_risk",
]


def fit_logistic_recalibration(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) maximising the likelihood of y ~ Bernoulli(sigmoid(a logit(p) + b)), unpenalised.

    Newton-Raphson with step halving on the two parameters; p is clipped to [1e-6, 1 - 1e-6]
    as at serving. Raises ValueError where no finite maximum exists (one class only, a constant
    score, classes the score separates perfectly)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(p) != len(y) or len(y) == 0:
        raise ValueError("recalibration needs as many labels as probabilities, and some rows")
    if not (np.isfinite(p).all() and np.isin(y, (0.0, 1.0)).all()):
        raise ValueError("recalibration needs finite probabilities and 0/1 labels")
    q = np.clip(p, RECAL_CLIP, 1 - RECAL_CLIP)
    x = np.log(q) - np.log1p(-q)  # (N,) logit(p)
    if y.min() == y.max():
        raise ValueError("the site's rows hold one outcome class only: nothing to recalibrate")
    if x.min() == x.max():
        raise ValueError("the model gives every row the same risk: nothing to recalibrate")
    pos, neg = x[y == 1], x[y == 0]
    if neg.max() <= pos.min() or pos.max() <= neg.min():
        raise ValueError(
            "the model separates the site's outcomes perfectly: the logistic recalibration has "
            "no maximum-likelihood solution"
        )
    design = np.column_stack([x, np.ones_like(x)])  # (N, 2): slope a, intercept b

    def loglik(beta: np.ndarray) -> float:
        eta = design @ beta
        return float(np.sum(y * eta - np.logaddexp(0.0, eta)))

    beta = np.array([1.0, 0.0])
    current = loglik(beta)
    for _ in range(100):
        mu = 1.0 / (1.0 + np.exp(-(design @ beta)))
        grad = design.T @ (y - mu)
        hess = (design * (mu * (1 - mu))[:, None]).T @ design
        step = np.linalg.solve(hess, grad)
        t, accepted = 1.0, False
        while t > 1e-8 and not accepted:  # halve the step until the likelihood does not fall
            value = loglik(beta + t * step)
            accepted = value >= current - 1e-12
            t = t if accepted else t / 2
        if not accepted:  # no step improves the likelihood: at the maximum
            break
        beta, gain, current = beta + t * step, value - current, value
        if np.max(np.abs(t * step)) < 1e-10 or abs(gain) < 1e-13:
            break
    a, b = (float(v) for v in beta)
    if not (np.isfinite(a) and np.isfinite(b)):
        raise ValueError("the logistic recalibration did not converge")
    return a, b


def fit_risk_recalibration(
    p_raw: np.ndarray,
    y: np.ndarray,
    *,
    label: str,
    model_threshold: float,
    policy: str,
    min_cases: int = 30,
) -> dict[str, Any]:
    """A site's temperature, intercept and threshold for one label from the model's own
    probabilities `p_raw` and the site's outcomes `y` (0/1), with the evidence: sensitivity,
    specificity and calibration intercept/slope before (the model's own p at its threshold)
    and after (the site's p' at the site's threshold), on these rows.

    Refuses (SampleTooSmall) fewer than `min_cases` positives or negatives, and (ValueError) a
    slope a <= 0: the model's risk does not rise with the site's outcomes, which no
    recalibration can mend."""
    p_raw = np.asarray(p_raw, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    policy = policy.replace(" ", "")
    if not _POLICY.match(policy):
        raise ValueError(f"policy {policy!r}: use youden, sensitivity>=x or specificity>=x")
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if pos < min_cases or neg < min_cases:
        raise SampleTooSmall(
            f"{label}: {pos} positive and {neg} negative labelled rows; the policy {policy!r} "
            f"needs at least {min_cases} of each (--min-cases)"
        )
    a, b = fit_logistic_recalibration(p_raw, y)
    if a <= 0:
        raise ValueError(
            f"{label}: the calibration slope at this site is {a:.3g} (<= 0): the site's "
            "outcomes do not rise with the model's risk, so no recalibration can make it "
            "useful here; do not use this model at this site"
        )
    temperature = 1.0 / a
    p_site = recalibrate_probability(p_raw, temperature, b)
    threshold = choose_threshold(y, p_site, policy)
    return {
        "temperature": float(temperature),
        "intercept": float(b),
        "threshold": float(threshold),
        "evidence": {
            "n": len(y),
            "positives": pos,
            "policy": policy,
            "model_threshold": float(model_threshold),
            "before": _judged(y, p_raw, model_threshold),
            "after": _judged(y, p_site, threshold),
        },
    }


def recalibrate_risk(
    model_path: str | Path,
    table: str | Path,
    *,
    rows: dict[str, str] | None = None,
    policy: str | None = None,
    min_cases: int = 30,
) -> dict[str, Any]:
    """A site profile's fields for a risk model from the site's labelled rows.

    `table`: CSV (or Parquet) in the model's own schema, with its outcome column; `rows`
    selects rows by column value (e.g. {"SiteNo": "7"}). Rows are validated with the schema in
    the model file: refused rows (outside the intended population, invalid values, no
    outcome) are counted by code in "refused" and never scored. Subgroup, site and patient
    columns are not needed. Returns the shape of `recalibrate.recalibrate` ("model_sha256",
    "temperatures", "intercepts", "thresholds", "policy", "evidence" per label) plus
    "refused"."""
    scorer = RiskModel(model_path)
    chosen = policy or scorer.metadata.thresholds[scorer.label].policy
    df = read_table(table)
    read = len(df)
    df = select_rows(df, rows or {})
    # the model's features, population and outcome; report-only columns are not required
    schema = scorer.schema.model_copy(
        update={"subgroups": {}, "site_column": None, "patient_column": None}
    )
    vt = validate_records(df, schema)
    refused = vt.refusals()
    if len(vt.y) == 0:
        raise ValueError(
            f"none of the {len(df)} selected rows can be used ({_counts(refused)}): "
            "nothing to recalibrate"
        )
    p_raw = scorer.predict(vt.X)
    if not np.isfinite(p_raw).all():
        raise ValueError("the model produced a non-finite risk on the site's rows")
    return _site_profile_fields(
        scorer, p_raw, vt.y, chosen, min_cases, refused,
        rows={"read": read, "selected": len(df), "used": len(vt.y), "selection": rows or {}},
        refused=refused,
    )  # fmt: skip


def _site_profile_fields(
    scorer: RiskModel,
    p_raw: np.ndarray,
    y: np.ndarray,
    policy: str,
    min_cases: int,
    refused_counts: dict[str, int],
    **evidence: Any,
) -> dict[str, Any]:
    """The fit, as the fields of a site profile (the shape of `recalibrate.recalibrate`)."""
    label = scorer.label
    fit = fit_risk_recalibration(
        p_raw, y, label=label, model_threshold=scorer.threshold, policy=policy,
        min_cases=min_cases,
    )  # fmt: skip
    fit["evidence"].update(evidence)
    return {
        "model_sha256": scorer.sha256,
        "temperatures": {label: fit["temperature"]},
        "intercepts": {label: fit["intercept"]},
        "thresholds": {label: fit["threshold"]},
        "policy": policy,
        "evidence": {label: fit["evidence"]},
        "refused": refused_counts,
    }


def recalibrate_risk_from_outcomes(
    model_path: str | Path,
    pairs: list[tuple[Any, ...]],
    *,
    policy: str | None = None,
    min_cases: int = 30,
) -> dict[str, Any]:
    """The same fit from the outcomes clinicians recorded in the service for this model file
    (`Store.risk_outcome_pairs` of one clinic): each record's raw probability (the model's own,
    before any earlier profile) against its confirmed outcome. Records another model file
    scored are left out: a profile belongs to one file."""
    scorer = RiskModel(model_path)
    chosen = policy or scorer.metadata.thresholds[scorer.label].policy
    mine = [pr for pr in pairs if pr[2] == scorer.sha256]
    if not mine:
        raise ValueError(
            f"no record scored by this model file ({scorer.sha256[:12]}) has a recorded outcome "
            f"at this site ({len(pairs)} with another file)"
        )
    p_raw = np.array([float(pr[4]) for pr in mine])
    y = np.array([1.0 if pr[5] else 0.0 for pr in mine])
    return _site_profile_fields(
        scorer, p_raw, y, chosen, min_cases, {},
        source="recorded outcomes", other_model_files=len(pairs) - len(mine),
    )  # fmt: skip


def select_rows(df: pd.DataFrame, rows: dict[str, str]) -> pd.DataFrame:
    """The rows whose columns equal the given values ('7', 7 and 7.0 are the same value)."""
    keep = np.ones(len(df), dtype=bool)
    for column, value in rows.items():
        if column not in df.columns:
            raise ValueError(f"--rows {column}={value}: no column {column!r} in the table")
        keep &= (df[column].map(_text) == _text(value)).to_numpy()
    if not keep.any():
        shown = ", ".join(f"{c}={v}" for c, v in rows.items())
        raise ValueError(f"no row of the table has {shown}")
    return df[keep].reset_index(drop=True)


def _text(value: Any) -> str:
    if isinstance(value, str):
        value = value.strip()
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _judged(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float | None]:
    at = at_threshold(y, p, threshold)
    cal = calibration_fields(y, p)
    out = {
        "sensitivity": at["sensitivity"],
        "specificity": at["specificity"],
        "calibration_intercept": cal["calibration_intercept"],
        "calibration_slope": cal["calibration_slope"],
    }
    # JSON for the profile's evidence: an undefined value is null, never NaN
    return {k: float(v) if np.isfinite(v) else None for k, v in out.items()}


def _counts(refused: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in refused.items()) or "none refused"
