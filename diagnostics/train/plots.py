"""ROC, precision-recall and reliability diagrams as PNG files (matplotlib, no global state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diagnostics.train.metrics import reliability


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, p)  # one point per distinct score: ties never depend on order
    return fpr, tpr


def save_plots(
    y: np.ndarray, p: np.ndarray, finding: str, out_dir: str | Path, bins: int = 10
) -> list[Path]:
    """roc_<finding>.png, pr_<finding>.png, reliability_<finding>.png; NaN labels skipped."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = ~np.isnan(y)
    y, p = np.asarray(y)[keep].astype(float), np.asarray(p)[keep].astype(float)
    paths = []
    if len(y) == 0 or y.min() == y.max():
        return paths

    fig, ax = _figure()
    fpr, tpr = _roc_points(y, p)
    ax.plot(fpr, tpr, lw=1.5)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC: {finding}")
    paths.append(out_dir / f"roc_{finding}.png")
    fig.savefig(paths[-1], bbox_inches="tight")

    from sklearn.metrics import precision_recall_curve

    fig, ax = _figure()
    precision, recall, _ = precision_recall_curve(y, p)
    ax.step(recall, precision, where="post", lw=1.5)
    ax.axhline(y.mean(), ls="--", c="grey", lw=0.8)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=f"PR: {finding}")
    ax.set_ylim(0, 1.02)
    paths.append(out_dir / f"pr_{finding}.png")
    fig.savefig(paths[-1], bbox_inches="tight")

    fig, ax = _figure()
    rel = reliability(y, p, bins)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.plot(rel["predicted"], rel["observed"], marker="o", lw=1.5)
    ax.set(xlabel="predicted probability", ylabel="observed rate", title=f"Reliability: {finding}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    paths.append(out_dir / f"reliability_{finding}.png")
    fig.savefig(paths[-1], bbox_inches="tight")
    return paths


def save_decision_curve(curve: dict[str, list[float]], out_dir: str | Path, label: str) -> Path:
    """decision_curve_<label>.png: net benefit of the model, treat-all and treat-none."""
    fig, ax = _figure()
    ax.plot(curve["threshold"], curve["model"], label="model", lw=1.5)
    ax.plot(curve["threshold"], curve["treat_all"], label="treat all", ls="--")
    ax.plot(curve["threshold"], curve["treat_none"], label="treat none", ls=":")
    ax.set(xlabel="threshold probability", ylabel="net benefit", title=f"Decision curve: {label}")
    ax.set_ylim(min(-0.05, min(curve["model"])), max(0.05, max(curve["treat_all"]) * 1.1))
    ax.legend()
    path = Path(out_dir) / f"decision_curve_{label}.png"
    fig.savefig(path, bbox_inches="tight")
    return path
