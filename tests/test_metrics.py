"""Metrics and calibration against independent references."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from diagnostics.train import metrics as M
from diagnostics.train.calibrate import choose_threshold, fit_temperature, sigmoid


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(float)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 400), 0, 1)
    p[:20] = 0.5  # ties
    return y, p


def test_auroc_and_auprc_match_sklearn(scores):
    y, p = scores
    assert M.auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert M.auprc(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-3)


def test_nan_labels_are_skipped(scores):
    y, p = scores
    y2 = y.copy()
    y2[::7] = np.nan
    keep = ~np.isnan(y2)
    assert M.auroc(y2, p) == pytest.approx(roc_auc_score(y[keep], p[keep]))
    assert M.finding_report(y2, p, 0.5, n_boot=0)["n"] == keep.sum()


def test_one_class_gives_nan():
    assert np.isnan(M.auroc(np.ones(5), np.linspace(0, 1, 5)))


def test_bootstrap_ci_brackets_the_estimate(scores):
    y, p = scores
    lo, hi = M.bootstrap_ci(M.auroc, y, p, n=300, seed=1)
    assert lo < M.auroc(y, p) < hi and hi - lo < 0.2


def test_threshold_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1.0])
    p = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.3, 0.05, 0.6])
    m = M.at_threshold(y, p, 0.5)  # TP 3, FN 1, FP 1, TN 3
    assert m == {"sensitivity": 0.75, "specificity": 0.75, "ppv": 0.75, "npv": 0.75}


def test_ece_and_brier():
    y = np.array([0, 0, 1, 1.0])
    assert M.ece(y, np.array([0.0, 0.0, 1.0, 1.0])) == 0.0
    assert M.ece(y, np.full(4, 0.75)) == pytest.approx(0.25)
    assert M.brier(y, np.full(4, 0.5)) == pytest.approx(0.25)


def test_temperature_recovers_a_known_scale():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 4, 20000)
    y = (rng.random(20000) < sigmoid(z / 2.5)).astype(float)
    assert fit_temperature(z, y) == pytest.approx(2.5, rel=0.08)
    assert fit_temperature(z, np.ones_like(z)) == 1.0  # nothing to fit


def test_threshold_policies(scores):
    y, p = scores
    t_sens = choose_threshold(y, p, "sensitivity>=0.9")
    assert M.at_threshold(y, p, t_sens)["sensitivity"] >= 0.9
    t_spec = choose_threshold(y, p, "specificity>=0.95")
    assert M.at_threshold(y, p, t_spec)["specificity"] >= 0.95
    t_y = choose_threshold(y, p, "youden")
    youden = lambda t: sum(M.at_threshold(y, p, t)[k] for k in ("sensitivity", "specificity"))  # noqa: E731
    assert all(youden(t_y) >= youden(t) - 1e-12 for t in np.unique(p))
    assert choose_threshold(np.ones(4), np.linspace(0, 1, 4), "youden") == 0.5


def test_auprc_does_not_depend_on_the_order_of_ties():
    assert M.auprc(np.array([0, 1.0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert M.auprc(np.array([1, 0.0]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_thresholds_stay_in_the_unit_interval():
    y = np.array([0, 1, 0, 1.0])
    p = np.array([1.0, 0.9, 0.2, 0.1])  # the top score is a negative
    for policy in ("youden", "specificity>=1.0", "sensitivity>=0", "sensitivity>=1.0"):
        assert 0.0 <= choose_threshold(y, p, policy) <= 1.0


# --------------------------------------------------------------------------- calibration slope


def _saturated(n_agree: int, n_flip: int, flip_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities at 1e-12 and 1 - 1e-12: `n_agree` of each class scored on its own side,
    `n_flip` of each scored `flip_p` away from the other side."""
    hi, lo = 1 - 1e-12, 1e-12
    p = np.r_[np.full(n_agree, hi), np.full(n_flip, flip_p), np.full(n_agree, lo)]
    p = np.r_[p, np.full(n_flip, 1 - flip_p)]
    y = np.r_[np.ones(n_agree + n_flip), np.zeros(n_agree + n_flip)]
    return y, p


def test_calibration_slope_of_well_calibrated_and_overconfident_scores():
    rng = np.random.default_rng(5)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < sigmoid(z)).astype(float)
    fit = M.calibration_fit(y, sigmoid(z))
    assert fit.defined and fit.slope == pytest.approx(1.0, abs=0.05)
    assert fit.intercept == pytest.approx(0.0, abs=0.05)
    over = M.calibration_fit(y, sigmoid(2 * z))  # logits twice too large: overconfident
    assert over.slope == pytest.approx(0.5, abs=0.03)
    y[:5] = np.nan  # unknown labels are skipped, as everywhere here
    assert M.calibration_fit(y, sigmoid(z)).slope == pytest.approx(fit.slope, abs=0.01)


def test_calibration_slope_of_saturated_overlapping_scores_is_finite_and_sane():
    # 90% of each class on its own side at 1e-12 / 1 - 1e-12, 10% on the other side: the
    # recalibrated probability at either extreme is 0.9, so slope = logit(0.9) / logit(1-1e-12)
    y, p = _saturated(90, 10, 1e-12)
    fit = M.calibration_fit(y, p)
    assert fit.defined
    assert fit.slope == pytest.approx(np.log(9) / np.log((1 - 1e-12) / 1e-12), rel=1e-4)
    assert fit.intercept == pytest.approx(0.0, abs=1e-6)


def test_calibration_slope_is_nan_with_a_reason_where_it_does_not_exist():
    # every positive above every negative, all near 0 and 1: the case that once read 3.7e10
    y, p = _saturated(90, 10, 1e-9)
    p[90:100], p[190:] = 1 - 1e-9, 1e-9  # the "flipped" ones stay on their own side
    fit = M.calibration_fit(y, p)
    assert np.isnan(fit.slope) and "separates the classes perfectly" in fit.reason
    assert np.isfinite(fit.intercept)  # calibration-in-the-large still exists
    # ties at the boundary (quasi-complete separation) have no finite slope either
    tied = M.calibration_fit(np.array([0, 0, 1, 1.0]), np.array([0.1, 0.5, 0.5, 0.9]))
    assert np.isnan(tied.slope) and "separates" in tied.reason
    one = M.calibration_fit(np.ones(10), np.linspace(0.1, 0.9, 10))
    assert np.isnan(one.slope) and np.isnan(one.intercept) and "one class" in one.reason
    flat = M.calibration_fit(np.array([0, 1, 0, 1.0]), np.full(4, 0.3))
    assert np.isnan(flat.slope) and "same for every row" in flat.reason
    assert M.calibration_text(fit.slope, fit.reason).startswith("undefined (the score separates")
    assert M.calibration_text(0.987) == "0.99" and M.calibration_text(None) == "undefined"


def test_undefined_slope_in_compare_text_and_gate():
    """`models compare` prints "undefined" with the reason, and a slope gate fails on it."""
    from diagnostics.train.compare import compare_finding, render_markdown
    from diagnostics.train.governance import Gate, check_gate

    y, separated = _saturated(40, 0, 0.5)
    rng = np.random.default_rng(1)
    mixed = 0.2 * y + rng.uniform(0.1, 0.7, len(y))  # the classes overlap
    r = compare_finding(y, separated, mixed, 0.5, 0.5, None, n_boot=0)
    assert np.isnan(r["candidate"]["calibration_slope"])
    assert "separates" in r["candidate"]["calibration_note"]
    assert r["baseline"]["calibration_note"] is None
    r["disagreements"] = []
    report = {
        "candidate": {"label": "models:/x/2", "sha256": "a" * 64},
        "baseline": {"label": "models:/x/1", "sha256": "b" * 64},
        "dataset": {"name": "synthetic", "split": "val", "images": len(y)},
        "findings": {"Pneumonia": r},
    }
    text = render_markdown(report)
    assert "| undefined/" in text and "3.7e" not in text
    assert "Pneumonia, candidate: calibration slope undefined: the score separates" in text
    gate = Gate(data={}, calibration_slope=(0.8, 1.25), require_parity=False)
    gate = gate.model_copy(update={"require_qc_reference": False})
    (rule,) = check_gate(gate, report, None, True)
    assert rule[1] is False and "undefined (the score separates" in rule[2]
    report["findings"]["Pneumonia"]["candidate"] = r["baseline"]  # a defined slope is judged
    (rule,) = check_gate(gate, report, None, True)
    assert rule[2] == M.calibration_text(r["baseline"]["calibration_slope"])


def test_the_decision_has_one_home():
    """contract.calibrated_probability and is_positive: what training, export and the clinic
    all use. A non-finite logit is never a confident 0 or 1."""
    from diagnostics.contract import calibrated_probability, is_positive

    z = np.array([[0.0, 2.0, -1e9, np.nan, np.inf]])
    p = calibrated_probability(z, [1.0, 2.0, 1.0, 1.0, 1.0])
    assert p.dtype == np.float64 and p.shape == (1, 5)
    assert p[0, 0] == 0.5 and p[0, 1] == pytest.approx(sigmoid(np.array(1.0)))
    assert 0.0 < p[0, 2] < 1e-25 and np.isnan(p[0, 3]) and np.isnan(p[0, 4])
    assert is_positive(0.5, 0.5) is True and is_positive(0.4999, 0.5) is False
    assert is_positive(np.array([0.2, np.nan, 0.9]), 0.5).tolist() == [False, False, True]
