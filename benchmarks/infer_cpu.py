"""Batch-1 and batch-8 latency: the exported ONNX model in ONNX Runtime versus torch eager.

Both run the same inputs on the CPU with the same thread count, measured in one run; the ratio
is what to read (absolute times drift about 10% between runs). Latency does not depend on the
weights, so the torch twin is built from the ONNX metadata with random weights.

    .venv/bin/python benchmarks/infer_cpu.py                       # ResNet-18, 1 x 224 x 224
    .venv/bin/python benchmarks/infer_cpu.py --model path/to/model.onnx
        (a model.int8.onnx beside it, written by `eval.int8: true`, is timed too)

The random model is quantised to static int8 QDQ too (unless --no-int8), so one run prints
fp32 and int8 at batch 1 and 8. The int8 column says nothing about accuracy (random weights):
that is the training-time gate's job (`diagnostics.train.int8_gate`). The CPU's int8
instructions (VNNI/AMX, or none: the clinic then serves fp32) are printed with the results.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from timing import median_ms  # benchmarks/timing.py (scripts run from this folder)

from diagnostics.models.registry import create_model
from diagnostics.serve.runner import OnnxModel
from diagnostics.train.export import random_export


def random_int8(fp32_path: Path, n: int = 32) -> Path:
    """model.int8.onnx beside a random-weight export: static QDQ int8 (as `eval.int8: true`
    writes it), calibrated on `n` random inputs. Latency does not depend on the weights."""
    from diagnostics.train.export import quantize_int8

    meta = OnnxModel(fp32_path).metadata
    spec = meta.preprocessing
    assert spec is not None
    x = np.random.default_rng(1).random((n, spec.channels, spec.size, spec.size), np.float32)
    out = fp32_path.with_name("model.int8.onnx")
    quantize_int8(fp32_path, out, x, meta.model_copy(update={"quantization": "int8-qdq"}))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an exported .onnx file (default: ResNet-18)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument(
        "--no-int8",
        dest="int8",
        action="store_false",
        help="the random model without its int8 twin (default: quantised and timed beside fp32)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or random_export(
            args.arch, args.size, ["Pneumonia"], Path(tmp) / "model.onnx"
        )
        if args.model is None and args.int8:
            random_int8(Path(path))
        runner = OnnxModel(path, threads=args.threads)
        meta = runner.metadata
        spec = meta.preprocessing
        twin = create_model(
            meta.architecture, in_channels=spec.channels, num_classes=len(meta.labels)
        ).eval()
        print(
            f"{meta.architecture}, {spec.channels} x {spec.size} x {spec.size}, "
            f"{args.threads} threads, median of {args.repeat}; torch {torch.__version__}"
        )
        from diagnostics.serve.precision import int8_acceleration

        print(f"CPU int8 instructions: {int8_acceleration() or 'none (the clinic serves fp32)'}")
        int8_path = Path(path).with_name("model.int8.onnx")
        q8 = OnnxModel(int8_path, threads=args.threads) if int8_path.is_file() else None
        head = f"{'batch':>6}{'torch eager ms':>16}{'ORT fp32 ms':>13}{'speed-up':>10}"
        if q8 is not None:
            head += f"{'ORT int8 ms':>13}{'speed-up':>10}"
        print(head)
        for batch in (1, 8):
            x = np.random.default_rng(0).random((batch, spec.channels, spec.size, spec.size))
            x = x.astype(np.float32)
            xt = torch.from_numpy(x)
            with torch.inference_mode():
                t_torch = median_ms(lambda xt=xt: twin(xt), args.repeat, warmup=3)
            t_ort = median_ms(lambda x=x: runner.predict(x), args.repeat, warmup=3)
            line = f"{batch:>6}{t_torch:>16.1f}{t_ort:>13.1f}{t_torch / t_ort:>9.2f}x"
            if q8 is not None:
                t_q8 = median_ms(lambda x=x: q8.predict(x), args.repeat, warmup=3)
                line += f"{t_q8:>13.1f}{t_torch / t_q8:>9.2f}x"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
