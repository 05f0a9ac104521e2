"""Training images/s: our loop's batch path versus a bare torch loop, same model, same tensors.

Ours: cached uint16 images -> float -> per-image augmentation -> normalisation -> forward/backward
(bf16 autocast and channels-last where the CPU has bf16). Bare: the same model and precision on
a tensor already in memory, no augmentation. The ratio (ours / bare) shows how much the data path
costs: near 1.0 means training is compute-bound. Also prints the fp32 bare loop, so the bf16
speed-up is visible. Measured in one run.

    .venv/bin/python benchmarks/train_throughput.py [--arch resnet18 --size 128 --steps 12]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from diagnostics.contract import PreprocessSpec
from diagnostics.data.augment import CXRAugment
from diagnostics.models.registry import create_model
from diagnostics.train.cxr import _batch, autocast_dtype, masked_bce, normalize_torch


def images_per_s(model, make_batch, labels, steps: int, amp, channels_last: bool) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    t0 = None
    n = 0
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            t0, n = time.perf_counter(), 0
        x = make_batch()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            logits = model(x)
        loss = masked_bce(logits.float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += x.shape[0]
    return n / (time.perf_counter() - t0)  # type: ignore[operator]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    spec = PreprocessSpec(size=args.size, normalize="fixed")
    rng = np.random.default_rng(0)
    cache = rng.integers(0, 65535, (256, args.size, args.size), dtype=np.uint16)
    labels = torch.from_numpy(rng.integers(0, 2, (args.batch, 1)).astype(np.float32))
    augment = CXRAugment()
    amp = autocast_dtype(torch.device("cpu"), True)
    fixed = normalize_torch(torch.rand(args.batch, 1, args.size, args.size), spec)

    def ours():
        return _batch(cache, rng.integers(0, len(cache), args.batch), spec, augment)

    def bare():
        return fixed

    def fresh():
        torch.manual_seed(0)
        return create_model(args.arch, in_channels=1, num_classes=1)

    cl = amp is not None
    rows = [
        ("bare loop, fp32", images_per_s(fresh(), bare, labels, args.steps, None, False)),
        (
            f"bare loop, {'bf16 + channels-last' if cl else 'fp32'}",
            images_per_s(
                fresh().to(memory_format=torch.channels_last) if cl else fresh(),
                bare,
                labels,
                args.steps,
                amp,
                cl,
            ),
        ),
        (
            f"our loop (cache + augment), {'bf16 + channels-last' if cl else 'fp32'}",
            images_per_s(
                fresh().to(memory_format=torch.channels_last) if cl else fresh(),
                ours,
                labels,
                args.steps,
                amp,
                cl,
            ),
        ),
    ]
    print(
        f"{args.arch}, 1 x {args.size} x {args.size}, batch {args.batch}, {args.threads} threads,"
        f" {args.steps} steps; bf16 on this CPU: {amp is not None}"
    )
    base = rows[1][1]
    for name, speed in rows:
        print(f"{name:<46}{speed:>8.1f} img/s{speed / base:>8.2f}x")
    print("ratio of the last row to the second: the share of speed our data path keeps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
