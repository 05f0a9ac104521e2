"""The int8 gate: may the int8 model stand in for the fp32 one at the clinic?

Measured at training time on the validation split, both models run by ONNX Runtime as the
clinic runs them:

- discrimination: per finding, AUROC(int8) - AUROC(fp32); the gate takes the WORST finding,
  |change| <= MAX_AUROC_DELTA (0.005). A finding whose AUROC is undefined (one class only) is
  left out; if every finding is, the gate fails.
- heatmaps: on a sample of validation images (the first `cam_images`), for every finding, the
  CAM the runner turns into the overlay (`cam` output, logit units): the mean Pearson
  correlation with fp32's >= MIN_CAM_CORRELATION (0.95), and the hottest cell the same in at
  least MIN_SAME_PEAK (95%) of the pairs: the same cell or a neighbour (Chebyshev distance 1,
  the same spot on the upsampled overlay), or a tie within 1% of the map's range.

The result (`contract.Int8Gate`) goes into the int8 file's metadata and into MLflow.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from diagnostics.contract import Int8Gate
from diagnostics.train.metrics import auroc

MAX_AUROC_DELTA = 0.005
MIN_CAM_CORRELATION = 0.95
MIN_SAME_PEAK = 0.95
PEAK_TIE = 0.01  # a cell within 1% of the map's range of its maximum ties with the peak


def cam_agreement(cam32: np.ndarray, cam8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (image, finding): the Pearson correlation of the two CAMs and whether their hottest
    cell is the same. `cam*` (B, F, h, w). A flat map correlates 1 with a flat map, 0 else."""
    a = cam32.reshape(cam32.shape[0] * cam32.shape[1], -1).astype(np.float64)
    b = cam8.reshape(a.shape).astype(np.float64)
    da, db = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    na, nb = np.sqrt((da**2).sum(1)), np.sqrt((db**2).sum(1))
    flat_a, flat_b = na <= 1e-12, nb <= 1e-12
    corr = np.where(
        flat_a | flat_b,
        (flat_a & flat_b).astype(np.float64),
        (da * db).sum(1) / np.maximum(na * nb, 1e-300),
    )
    w = cam32.shape[-1]
    peak8, peak32 = b.argmax(1), a.argmax(1)
    top32 = a.max(1)
    span = np.maximum(top32 - a.min(1), 1e-12)
    # The same peak: int8's hottest cell is fp32's hottest or touches it (one cell away, the
    # same spot once the map is upsampled onto the image), or ties with it in fp32's own map
    # (within PEAK_TIE of its range). An exact-cell rule fails on smooth maps whose top cells
    # differ by a few thousandths of the range, as fp32 runs on two CPUs may.
    near = (np.abs(peak8 // w - peak32 // w) <= 1) & (np.abs(peak8 % w - peak32 % w) <= 1)
    tie = a[np.arange(len(a)), peak8] >= top32 - PEAK_TIE * span
    return corr, near | tie


def evaluate_gate(
    y: np.ndarray,
    p32: np.ndarray,
    p8: np.ndarray,
    labels: list[str],
    cam32: np.ndarray | None,
    cam8: np.ndarray | None,
    *,
    max_auroc_delta: float = MAX_AUROC_DELTA,
    min_cam_correlation: float = MIN_CAM_CORRELATION,
    min_same_peak: float = MIN_SAME_PEAK,
) -> Int8Gate:
    """The gate from validation labels `y` (n, F; NaN unknown), both models' probabilities
    (n, F) and their CAMs on the sample (m, F, h, w), or None where the model has no CAM."""
    deltas: dict[str, float] = {}
    for i, f in enumerate(labels):
        known = ~np.isnan(y[:, i])
        a32, a8 = auroc(y[known, i], p32[known, i]), auroc(y[known, i], p8[known, i])
        if np.isfinite(a32) and np.isfinite(a8):
            deltas[f] = float(a8 - a32)
    worst = max(deltas, key=lambda f: abs(deltas[f])) if deltas else None
    gate = Int8Gate(
        passed=False,
        reason="",
        auroc_delta=abs(deltas[worst]) if worst else None,
        auroc_finding=worst,
        auroc_deltas=deltas,
        max_prob_diff=float(np.abs(p32 - p8).max()) if len(p32) else None,
        n=len(y),
        max_auroc_delta=max_auroc_delta,
        min_cam_correlation=min_cam_correlation,
        min_same_peak=min_same_peak,
    )
    if cam32 is not None and cam8 is not None and cam32.size:
        corr, same = cam_agreement(cam32, cam8)
        gate.cam_correlation = _finite_or_none(corr.mean())  # NaN (a flat map): undefined
        gate.cam_correlation_min = _finite_or_none(corr.min())
        gate.same_peak = _finite_or_none(same.mean())
        gate.n_cam = len(corr)
    failures = []
    if worst is None:
        failures.append("auroc_undefined")
    elif gate.auroc_delta is not None and not gate.auroc_delta <= max_auroc_delta:
        failures.append(f"auroc_delta {gate.auroc_delta:.4f} > {max_auroc_delta} ({worst})")
    # `not x >= limit`: a NaN or missing figure fails, it never passes by comparison
    if gate.cam_correlation is None:
        failures.append("no_cam" if cam32 is None or cam8 is None else "cam_undefined")
    else:
        if not gate.cam_correlation >= min_cam_correlation:
            failures.append(f"cam_correlation {gate.cam_correlation:.3f} < {min_cam_correlation}")
        if gate.same_peak is None or not gate.same_peak >= min_same_peak:
            shown = "undefined" if gate.same_peak is None else f"{gate.same_peak:.3f}"
            failures.append(f"same_peak {shown} < {min_same_peak}")
    gate.passed = not failures
    gate.reason = "passed" if gate.passed else "failed:" + "; ".join(failures)
    return gate


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def run_gate(
    fp32: object,
    int8: object,
    batches: Iterable[np.ndarray],
    y: np.ndarray,
    *,
    cam_images: int = 32,
) -> tuple[Int8Gate, np.ndarray, np.ndarray]:
    """Both OnnxModels over the validation `batches` (preprocessed, in `y`'s order); the gate
    and both models' probabilities. CAMs on the first `cam_images` images."""
    p32, p8, c32, c8 = [], [], [], []
    seen = 0
    for x in batches:
        cam = seen < cam_images
        r32 = fp32.predict(x, cam=cam)  # type: ignore[attr-defined]
        r8 = int8.predict(x, cam=cam)  # type: ignore[attr-defined]
        p32.append(r32.probabilities)
        p8.append(r8.probabilities)
        if cam and r32.cam is not None and r8.cam is not None:
            take = cam_images - seen
            c32.append(r32.cam[:take])
            c8.append(r8.cam[:take])
        seen += len(x)
    a, b = np.concatenate(p32), np.concatenate(p8)
    labels = list(fp32.metadata.labels)  # type: ignore[attr-defined]
    gate = evaluate_gate(
        y,
        a,
        b,
        labels,
        np.concatenate(c32) if c32 else None,
        np.concatenate(c8) if c8 else None,
    )
    return gate, a, b


def tag(gate: Int8Gate) -> dict[str, str]:
    """MLflow tags of the gate: `int8_gate=passed|failed:<reason>`."""
    return {"int8_gate": gate.reason[:5000]}


def metrics(gate: Int8Gate) -> dict[str, float]:
    """The gate's figures as flat MLflow metrics (finite values only)."""
    out = {
        "int8_gate.passed": float(gate.passed),
        "int8_gate.auroc_delta": gate.auroc_delta,
        "int8_gate.cam_correlation": gate.cam_correlation,
        "int8_gate.cam_correlation_min": gate.cam_correlation_min,
        "int8_gate.same_peak": gate.same_peak,
        "int8_gate.n": float(gate.n),
        "int8_gate.n_cam": float(gate.n_cam),
    }
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}
