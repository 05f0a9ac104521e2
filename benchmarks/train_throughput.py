"""Where the training time goes: our loop's batch path, step by step, against a bare torch loop.

Per batch, measured in one run on the same tensors: reading the uint16 cache into floats, each
augmentation stage (geometry, intensity, acquisition), normalisation, and the forward/backward/
optimiser step (bf16 autocast and channels-last where the CPU has bf16). The bare loop is the
same model and precision on a tensor already in memory, with no data path at all: the ratio of
our loop to it shows how much the data path costs (near 1.0: compute-bound). The fp32 bare loop
shows the bf16 speed-up. With `--config`, the network, size and augmentation come from a
training config (e.g. configs/cxr/kermany.yaml); a whole run's own phases (caching, training,
validation, calibration, QC references, export, int8, MLflow) are in its metrics.json
`timing_s`.

    .venv/bin/python benchmarks/train_throughput.py --config configs/cxr/kermany.yaml
    .venv/bin/python benchmarks/train_throughput.py --arch resnet18 --size 224
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from diagnostics.contract import PreprocessSpec
from diagnostics.data.augment import acquisition, geometry, intensity
from diagnostics.data.cache import from_uint16
from diagnostics.models.registry import create_model
from diagnostics.train.config import AugmentConfig, load_train_config
from diagnostics.train.cxr import autocast_dtype, masked_bce, normalize_torch


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


def ms_per_call(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a training config: network, size and augmentation")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    options: dict = {}
    aug = AugmentConfig()
    if args.config:
        cfg = load_train_config(args.config)
        args.arch, args.size, options = cfg.model.name, cfg.preprocess.size, cfg.model.options
        args.batch, aug = cfg.train.batch_size, cfg.augment
    spec = PreprocessSpec(size=args.size, normalize="fixed")
    rng = np.random.default_rng(0)
    cache = rng.integers(0, 65535, (512, args.size, args.size), dtype=np.uint16)
    labels = torch.from_numpy(rng.integers(0, 2, (args.batch, 1)).astype(np.float32))
    amp = autocast_dtype(torch.device("cpu"), True)
    cl = amp is not None

    def fresh():
        torch.manual_seed(0)
        m = create_model(args.arch, in_channels=1, num_classes=1, **options)
        return m.to(memory_format=torch.channels_last) if cl else m

    # One batch through each stage of our data path.
    def read():
        return torch.from_numpy(
            from_uint16(cache[np.sort(rng.integers(0, len(cache), args.batch))])
        )[:, None]

    x0 = read()
    x1 = geometry(x0, aug.rotate_degrees, aug.translate, aug.scale, aug.hflip, aug.white_border)
    x2 = intensity(x1, aug.brightness, aug.contrast)
    x3 = acquisition(x2, aug.gamma, aug.sharpness, aug.noise)
    stages = [
        ("read cache (uint16 -> float)", lambda: read()),
        ("augment: geometry", lambda: geometry(x0, aug.rotate_degrees, aug.translate, aug.scale)),
        ("augment: intensity", lambda: intensity(x1, aug.brightness, aug.contrast)),
        ("augment: acquisition", lambda: acquisition(x2, aug.gamma, aug.sharpness, aug.noise)),
        ("normalise", lambda: normalize_torch(x3, spec)),
    ]
    repeat = max(args.steps, 10)
    data_ms = [(name, ms_per_call(fn, repeat)) for name, fn in stages]
    fixed = normalize_torch(x3, spec)
    step_speed = images_per_s(fresh(), lambda: fixed, labels, args.steps, amp, cl)
    step_ms = args.batch / step_speed * 1000.0
    fp32_speed = images_per_s(
        create_model(args.arch, in_channels=1, num_classes=1, **options),
        lambda: fixed,
        labels,
        args.steps,
        None,
        False,
    )

    def ours():
        x = read()
        if aug.enabled:
            x = geometry(
                x, aug.rotate_degrees, aug.translate, aug.scale, aug.hflip, aug.white_border
            )
            x = acquisition(
                intensity(x, aug.brightness, aug.contrast), aug.gamma, aug.sharpness, aug.noise
            )
        return normalize_torch(x, spec)

    our_speed = images_per_s(fresh(), ours, labels, args.steps, amp, cl)

    print(
        f"{args.arch} {options or ''}, 1 x {args.size} x {args.size}, batch {args.batch}, "
        f"{args.threads} threads, {args.steps} steps; bf16 on this CPU: {cl}"
    )
    total = sum(ms for _, ms in data_ms) + step_ms
    print(f"{'per batch':<40}{'ms':>9}{'share':>8}")
    for name, ms in [
        *data_ms,
        (f"forward + backward + step ({'bf16' if cl else 'fp32'})", step_ms),
    ]:
        print(f"{name:<40}{ms:>9.2f}{ms / total:>8.0%}")
    print()
    rows = [
        ("bare loop, fp32", fp32_speed),
        (f"bare loop, {'bf16 + channels-last' if cl else 'fp32'}", step_speed),
        (f"our loop (cache + augment), {'bf16 + channels-last' if cl else 'fp32'}", our_speed),
    ]
    for name, speed in rows:
        print(f"{name:<46}{speed:>8.1f} img/s{speed / step_speed:>8.2f}x")
    print("ratio of the last row to the second: the share of speed our data path keeps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
