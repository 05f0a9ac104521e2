"""The out-of-distribution reference that input QC uses (see `contract.OODReference`).

Fitted at export time on the pooled features of training images; the threshold comes from
held-out validation images, scored exactly as the clinic side scores them (`serve.qc`).
"""

from __future__ import annotations

import numpy as np
import torch

from diagnostics.contract import OODReference
from diagnostics.serve.qc import OODDetector, encode_array


def embeddings(model: torch.nn.Module, batches: list[torch.Tensor]) -> np.ndarray:
    """Pooled features (N, C) float64 of a CAMClassifier, fp32, eval mode, on the CPU."""
    model = model.float().eval().cpu()
    out = []
    with torch.no_grad():
        for x in batches:
            out.append(model.forward_all(x.float())[2].double().numpy())
    return np.concatenate(out)


def fit_reference(
    train: np.ndarray,
    val: np.ndarray,
    *,
    components: int = 32,
    quantile: float = 0.995,
    margin: float = 1.5,
) -> OODReference:
    """PPCA of `train` (N, C) features; threshold = `quantile` of `val` scores x `margin`."""
    n, dim = train.shape
    if n < 2 or len(val) < 1:
        raise ValueError("the OOD reference needs at least 2 training and 1 validation image")
    mean = train.mean(axis=0)
    centred = train - mean
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    eig = sing**2 / (n - 1)  # variances along the principal directions, descending
    k = max(1, min(components, len(eig) - 1, dim - 1)) if dim > 1 else 1
    total = float(eig.sum())
    # Floors keep dead channels and tiny directions from dominating: 1% of the mean variance.
    floor = max(0.01 * total / dim, 1e-12)
    rest = eig[k:]
    residual = float(rest.sum() / max(dim - k, 1)) if len(rest) else floor
    ref = OODReference(
        dim=dim,
        mean=encode_array(mean),
        components=encode_array(vt[:k]),
        variances=[float(v) for v in np.maximum(eig[:k], floor)],
        residual_variance=max(residual, floor),
        threshold=1.0,  # replaced below, once validation images are scored
        quantile=quantile,
        margin=margin,
        fitted_on=n,
    )
    scores = OODDetector(ref).score(val)
    q = float(np.quantile(scores, quantile))
    return ref.model_copy(
        update={
            "threshold": q * margin,
            "validation_scores": {
                "median": float(np.median(scores)),
                "q99": float(np.quantile(scores, 0.99)),
                "max": float(scores.max()),
            },
        }
    )
