"""Helpers the benchmark scripts share: a median after warm-up calls, and distinct PNG inputs."""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable

import numpy as np


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median wall time of `fn` in milliseconds over `repeat` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def noisy_pngs(base: np.ndarray, n: int, sigma: float, seed: int = 0) -> list[bytes]:
    """n distinct 8-bit PNGs: `base` (H, W) in [0, 1] plus Gaussian noise of `sigma`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        noisy = np.clip(base + rng.normal(0, sigma, base.shape), 0, 1)
        buf = io.BytesIO()
        Image.fromarray(np.round(noisy * 255).astype(np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out
