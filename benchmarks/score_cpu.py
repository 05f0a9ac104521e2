"""End-to-end CPU latency per study: decode + QC + preprocess + model (+ OOD check), for the
real DICOM chest (uncompressed and JPEG 2000) and a real NIH PNG, against the model alone
(batch 1, preprocessed input) measured in the same run.

    .venv/bin/python benchmarks/score_cpu.py --model .diagnostics/runs/kermany-*/model.onnx
    .venv/bin/python benchmarks/score_cpu.py            # a random ResNet-18 at 224 px

Prints per input: the outcome (scored, or the QC code), median and p90 of the whole path, the
median of each step, the share of time spent decoding, and end-to-end / model-only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diagnostics.imaging import decode, preprocess
from diagnostics.serve.runner import OnnxModel, Scorer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
INPUTS = {
    "DICOM chest CR 1841x1955, uncompressed": "dicom/pydicom-data_RG1_UNCR.dcm",
    "DICOM chest CR 1841x1955, JPEG 2000 lossless": "dicom/pydicom-data_RG1_J2KR.dcm",
    "NIH PNG 1024x1024": "cxr/nih_sample/images/00000211_013.png",
}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an exported .onnx (default: random ResNet-18)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="ORT threads; 0 = ORT default")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: needs {SHARED} (real DICOM and NIH images)")
        return 0
    if args.model is None:
        from infer_cpu import random_export  # benchmarks/infer_cpu.py

        args.model = random_export(
            "resnet18", 224, ["Pneumonia"], Path(tempfile.mkdtemp()) / "resnet18.onnx"
        )
    model = OnnxModel(args.model, device="cpu", threads=args.threads or None)
    scorer = Scorer(model)  # no heatmap files: the latency of the scoring path itself
    spec = model.metadata.preprocessing
    print(
        f"model {args.model.name} ({model.metadata.architecture}, {spec.size} px, "
        f"{model.metadata.quantization or 'fp32'}), sha256 {model.sha256[:12]}, "
        f"{model.provider}, {args.repeat} runs per input"
    )
    for name, rel in INPUTS.items():
        path = SHARED / rel
        if not path.is_file():
            print(f"{name}: skipped ({rel} absent)")
            continue
        data = path.read_bytes()
        x = preprocess(decode(data).pixels, spec)[None]  # (1, C, S, S)
        model.predict(x)  # warm-up
        model_only = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            model.predict(x)
            model_only.append((time.perf_counter() - t0) * 1000)
        scorer.score(data)  # warm-up
        runs = [scorer.score(data) for _ in range(args.repeat)]
        totals = [r.timing_ms["total"] for r in runs]
        steps = {
            k: statistics.median(r.timing_ms.get(k, 0.0) for r in runs)
            for k in ("decode", "qc", "preprocess", "model")
        }
        last = runs[-1]
        outcome = last.status if last.status == "scored" else f"{last.status} ({last.code})"
        ood = f", OOD distance {last.ood_score:.2f}" if last.ood_score is not None else ""
        med = statistics.median(totals)
        print(f"\n{name}: {outcome}{ood}")
        print(f"  end to end: median {med:.1f} ms, p90 {_pct(totals, 90):.1f} ms")
        print("  steps (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
        print(f"  decoding share: {steps['decode'] / med:.0%}")
        mo = statistics.median(model_only)
        print(f"  model alone (batch 1): {mo:.1f} ms; end to end / model alone: {med / mo:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
