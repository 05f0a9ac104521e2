"""End-to-end CPU latency per study: decode + QC + preprocess + model (+ OOD check), for the
real DICOM chest (uncompressed and JPEG 2000 lossless) and a real NIH PNG, against the model
alone (batch 1, preprocessed input), before and after decoding at the model's resolution.

    .venv/bin/python benchmarks/score_cpu.py --model .diagnostics/runs/kermany-*/model.onnx
    .venv/bin/python benchmarks/score_cpu.py            # a random ResNet-18 at 224 px

"before": the Scorer with the full-resolution decode (`decode(data)`, as before `target=`
existed; the rest of the Scorer is as it is now, so "before" is not the old code's figure, which
the issue and the closing notes give); "after": the
Scorer as it is, decoding with `target=` the model's input side (JPEG 2000 at a reduced
resolution level, everything else box-averaged to about twice the input side). "before" runs
first, on its own (its full-resolution arrays would otherwise evict the caches of the path as it
is); then "after" and the model alone run interleaved (one each in turn), so that a machine's
changing load falls on both alike.

"Model alone" is a plain ONNX Runtime session on the preprocessed input (batch 1, all outputs):
the faster of two measurements, interleaved (its threads stop spinning after each run, as the
Scorer's do) and back to back in a block of its own with ORT's defaults (threads spinning
between runs). Prints a table of medians (ms and x the model alone), the fastest run of each
(and its ratio to the fastest model-alone run: the better estimate on a machine that other work
shares), and the median of each step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from diagnostics.imaging import decode, preprocess
from diagnostics.serve import runner
from diagnostics.serve.runner import OnnxModel, Scorer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
INPUTS = {
    "DICOM CR 1841x1955 uncompressed": "dicom/pydicom-data_RG1_UNCR.dcm",
    "DICOM CR 1841x1955 JPEG 2000 lossless": "dicom/pydicom-data_RG1_J2KR.dcm",
    "NIH PNG 1024x1024": "cxr/nih_sample/images/00000211_013.png",
}
STEPS = ("decode", "qc", "preprocess")


def _full_resolution(data: Any, *, max_pixels: int, target: int | None = None) -> Any:
    """The decode as it was before `target`: always full resolution."""
    return decode(data, max_pixels=max_pixels)


def _plain_session(path: Path, threads: int, *, stop_spinning: bool) -> Any:
    """The model alone: a plain ONNX Runtime session, all outputs. ORT's default lets its
    threads spin between runs (fastest back to back); `stop_spinning` stops them after each run
    (as the Scorer's session does), so that they do not take the cores from what runs next."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if stop_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _model_alone(session: Any, feed: str, x: np.ndarray, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.run(None, {feed: x})
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _score(scorer: Scorer, data: bytes, full: bool) -> Any:
    runner.decode = _full_resolution if full else decode  # type: ignore[assignment]
    try:
        return scorer.score(data)
    finally:
        runner.decode = decode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an exported .onnx (default: random ResNet-18)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--slow-repeat", type=int, default=5, help="runs for a path slower than 200 ms a run"
    )
    parser.add_argument("--threads", type=int, default=0, help="ORT threads; 0 = ORT default")
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: needs {SHARED} (real DICOM and NIH images)")
        return 0
    if args.model is None:
        from diagnostics.train.export import random_export

        args.model = random_export(
            "resnet18", 224, ["Pneumonia"], Path(tempfile.mkdtemp()) / "resnet18.onnx"
        )
    model = OnnxModel(args.model, device="cpu", threads=args.threads or None)
    alone = _plain_session(args.model, args.threads, stop_spinning=True)
    default = _plain_session(args.model, args.threads, stop_spinning=False)
    feed = model.input_name
    scorer = Scorer(model)  # no heatmap files: the latency of the scoring path itself
    spec = model.metadata.preprocessing
    print(
        f"model {args.model.name} ({model.metadata.architecture}, {spec.size} px, "
        f"{model.metadata.quantization or 'fp32'}), sha256 {model.sha256[:12]}, "
        f"{model.provider}; medians of {args.repeat} runs ({args.slow_repeat} of 'before' for a "
        "path over 200 ms); 'before' alone, 'after' interleaved with the model alone"
    )
    header = (
        f"{'input':<38}{'path':<8}{'total ms':>9}{'x model':>8}{'min ms':>8}{'x (min)':>8}"
        + "".join(f"{s + ' ms':>14}" for s in STEPS)
        + f"{'outcome':>12}"
    )
    lines = [header, "-" * len(header)]
    for name, rel in INPUTS.items():
        path = SHARED / rel
        if not path.is_file():
            lines.append(f"{name:<38}skipped ({rel} absent)")
            continue
        data = path.read_bytes()
        x = preprocess(decode(data).pixels, spec)[None]  # (1, C, S, S)
        alone.run(None, {feed: x})  # warm-up
        # The model alone back to back with ORT's defaults, in a block of its own (its spinning
        # threads would slow whatever ran beside them).
        _model_alone(default, feed, x, 3)
        back_to_back = _model_alone(default, feed, x, args.repeat)
        first = {full: _score(scorer, data, full) for full in (True, False)}  # warm-up
        slow = first[True].timing_ms["total"] > 200
        runs: dict[str, list[Any]] = {"before": [], "after": []}
        model_only: list[float] = []
        for _ in range(args.slow_repeat if slow else args.repeat):
            runs["before"].append(_score(scorer, data, True))
        for _ in range(args.repeat):  # the path as it is, interleaved with the model alone
            runs["after"].append(_score(scorer, data, False))
            t0 = time.perf_counter()
            alone.run(None, {feed: x})
            model_only.append((time.perf_counter() - t0) * 1000)
        # The baseline: the faster of the model alone interleaved and back to back.
        mo = min(statistics.median(model_only), statistics.median(back_to_back))
        mo_min = min(min(model_only), min(back_to_back))
        lines.append(
            f"{name:<38}{'model':<8}{mo:>9.1f}{1.0:>8.2f}{mo_min:>8.1f}{1.0:>8.2f}"
            f"   (interleaved {statistics.median(model_only):.1f} ms, back to back with ORT's "
            f"defaults {statistics.median(back_to_back):.1f} ms)"
        )
        for label, results in runs.items():
            total = statistics.median(r.timing_ms["total"] for r in results)
            fastest = min(r.timing_ms["total"] for r in results)
            steps = [statistics.median(r.timing_ms.get(k, 0.0) for r in results) for k in STEPS]
            last = results[-1]
            outcome = last.status if last.status == "scored" else f"{last.status}:{last.code}"
            lines.append(
                f"{'':<38}{label:<8}{total:>9.1f}{total / mo:>8.2f}"
                f"{fastest:>8.1f}{fastest / mo_min:>8.2f}"
                + "".join(f"{v:>14.1f}" for v in steps)
                + f"{outcome:>12}"
            )
        p_before = np.array([f.probability for f in runs["before"][-1].findings])
        p_after = np.array([f.probability for f in runs["after"][-1].findings])
        if p_before.size and p_before.shape == p_after.shape:
            lines.append(
                f"{'':<38}|probability after - before| = {np.abs(p_after - p_before).max():.2e}"
            )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
