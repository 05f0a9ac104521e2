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
