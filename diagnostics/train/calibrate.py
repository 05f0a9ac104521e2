"""Temperature scaling and operating-point selection, fitted on the validation split.

Temperature scaling (Guo et al. 2017) divides a finding's logit by T > 0 fitted to minimise the
validation log loss. It changes calibration, never the ranking, so AUROC is unchanged.

`calibrate` is the CXR training step: a temperature and an operating threshold per finding,
chosen on val, and the val and test reports of the calibrated probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import minimize_scalar

from diagnostics.contract import Threshold, calibrated_probability
from diagnostics.train.metrics import at_threshold, finding_report
from diagnostics.train.plots import save_plots

if TYPE_CHECKING:  # this file stays torch-free for the risk side
    import torch

    from diagnostics.train.config import CXRTrainConfig
    from diagnostics.train.cxr_data import CXRData, Images


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


@dataclass
class Calibration:
    temperatures: list[float]  # one per finding
    thresholds: dict[str, Threshold]
    val: dict[str, dict[str, float]]  # finding -> report
    test: dict[str, dict[str, float]] | None
    mean_val_auroc: float
    flat: dict[str, float]  # finite val metrics, "val.<finding>.<name>" and "val.mean_auroc"
    plots_dir: Path


def calibrate(
    cfg: CXRTrainConfig,
    model: torch.nn.Module,
    data: CXRData,
    images: Images,
    device: torch.device,
    run_dir: Path,
) -> Calibration:
    """A temperature and an operating threshold per finding, chosen on val; val and test
    reports (calibrated probabilities), and their plots under run_dir/plots."""
    from diagnostics.train.batches import predict_logits  # torch, only when a CXR model is fitted

    spec, ev, findings, idx = cfg.preprocess, cfg.eval, data.findings, data.idx
    bs = cfg.train.batch_size * 2
    val_logits = predict_logits(model, images.cache, idx["val"], spec, device, bs)  # fp32
    y_val = images.labels[idx["val"]]
    temps = [
        fit_temperature(val_logits[:, i], y_val[:, i]) if ev.calibrate else 1.0
        for i in range(len(findings))
    ]
    p_val = calibrated_probability(val_logits, temps)
    thresholds: dict[str, Threshold] = {}
    val_report: dict[str, dict[str, float]] = {}
    for i, f in enumerate(findings):
        t = choose_threshold(y_val[:, i], p_val[:, i], ev.threshold_policy)
        val_report[f] = finding_report(
            y_val[:, i], p_val[:, i], t, n_boot=ev.bootstrap, ece_bins=ev.ece_bins
        )
        val_report[f]["temperature"] = temps[i]
        thresholds[f] = Threshold(
            value=t,
            policy=ev.threshold_policy,
            sensitivity=_finite(val_report[f]["sensitivity"]),
            specificity=_finite(val_report[f]["specificity"]),
        )
    test_report = None
    plots_dir = run_dir / "plots"
    for i, f in enumerate(findings):
        save_plots(y_val[:, i], p_val[:, i], f"val_{f}", plots_dir, ev.ece_bins)
    if "test" in idx and len(idx["test"]):
        p_test = calibrated_probability(
            predict_logits(model, images.cache, idx["test"], spec, device, bs), temps
        )
        y_test = images.labels[idx["test"]]
        test_report = {
            f: finding_report(
                y_test[:, i],
                p_test[:, i],
                thresholds[f].value,
                n_boot=ev.bootstrap,
                ece_bins=ev.ece_bins,
            )
            for i, f in enumerate(findings)
        }
        for i, f in enumerate(findings):
            save_plots(y_test[:, i], p_test[:, i], f"test_{f}", plots_dir, ev.ece_bins)

    finite = [r["auroc"] for r in val_report.values() if np.isfinite(r["auroc"])]
    mean_val = float(np.mean(finite)) if finite else float("nan")
    flat = flat_report("val", val_report)
    if np.isfinite(mean_val):  # metadata holds finite numbers only
        flat["val.mean_auroc"] = mean_val
    return Calibration(temps, thresholds, val_report, test_report, mean_val, flat, plots_dir)


def flat_report(prefix: str, report: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"<prefix>.<finding>.<name>": value} for the finite values of a per-finding report."""
    return {
        f"{prefix}.{f}.{k}": float(v)
        for f, r in report.items()
        for k, v in r.items()
        if np.isfinite(v)
    }


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
