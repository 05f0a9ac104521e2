"""Batches of cached images, the masked loss, and predictions over cached images.

The image cache holds every image once, preprocessed, as uint16 (`data.cache`). `image_batch`
turns rows of it into a normalised (B, C, S, S) tensor, augmented for training or not. A NaN
label is unknown and adds nothing to the loss (`masked_bce`).
"""

from __future__ import annotations

import numpy as np
import torch

from diagnostics.contract import PreprocessSpec
from diagnostics.data.augment import CXRAugment
from diagnostics.data.cache import from_uint16
from diagnostics.train.population import ImagePool


def normalize_torch(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """(B, 1, S, S) in [0, 1] -> (B, C, S, S); the torch twin of `imaging.normalize`."""
    from diagnostics.contract import IMAGENET_MEAN, IMAGENET_STD

    x = x.expand(-1, spec.channels, -1, -1)
    if spec.normalize == "unit":
        return x.contiguous()
    mean, std = (
        (IMAGENET_MEAN, IMAGENET_STD) if spec.normalize == "imagenet" else (spec.mean, spec.std)
    )
    m = torch.tensor(np.broadcast_to(mean, (spec.channels,)), dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(np.broadcast_to(std, (spec.channels,)), dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def masked_bce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Binary cross-entropy over known labels only: NaN targets add nothing to loss or gradient.
    `smoothing` e moves targets to y(1 - e) + e/2."""
    known = ~torch.isnan(targets)
    y = torch.nan_to_num(targets, nan=0.0)
    if smoothing:
        y = y * (1 - smoothing) + 0.5 * smoothing
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, y, pos_weight=pos_weight, reduction="none"
    )
    return (loss * known).sum() / known.sum().clamp(min=1)


def val_log_loss(y: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary log loss (nats) of sigmoid(logits) over the known labels of (N, F) arrays."""
    known = ~np.isnan(y)
    z, t = logits[known], y[known]
    # log(1 + e^-z) for positives, log(1 + e^z) for negatives, computed stably
    return float(np.mean(np.logaddexp(0.0, -z) * t + np.logaddexp(0.0, z) * (1 - t)))


def image_batch(
    cache: np.ndarray | ImagePool,
    idx: np.ndarray,
    spec: PreprocessSpec,
    augment: CXRAugment | None,
) -> torch.Tensor:
    x = torch.from_numpy(from_uint16(cache[idx]))[:, None]  # (B, 1, S, S) in [0, 1]
    if augment is not None:
        x = augment(x)
    return normalize_torch(x, spec)


def predict_outputs(
    model: torch.nn.Module,
    cache: np.ndarray | ImagePool,
    idx: np.ndarray,
    spec: PreprocessSpec,
    device: torch.device,
    batch_size: int,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (N, F) and population logits (N,) or None, float64, for cached images `idx`."""
    model.eval()
    out, pop = [], []
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            x = image_batch(cache, idx[start : start + batch_size], spec, None).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits, population = model.forward_train(x)
            out.append(logits.float().cpu().numpy())
            if population is not None:
                pop.append(population.float().cpu().numpy())
    if not out:
        return np.zeros((0, 0)), None
    logits = np.concatenate(out).astype(np.float64)
    return logits, (np.concatenate(pop).astype(np.float64) if pop else None)


def predict_logits(
    model: torch.nn.Module,
    cache: np.ndarray | ImagePool,
    idx: np.ndarray,
    spec: PreprocessSpec,
    device: torch.device,
    batch_size: int,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """(N, F) float64 logits for cached images `idx`, in eval mode."""
    return predict_outputs(model, cache, idx, spec, device, batch_size, amp, channels_last)[0]
