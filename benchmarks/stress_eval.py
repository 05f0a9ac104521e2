"""A model on a dataset split as it is, and again after an acquisition shift, in one run.

The Kermany validation split saturates (AUROC 0.995+) and cannot rank recipes; the official
test split is kept elsewhere. This script asks a different question of the data we have: how
much do the model's ranking, calibration, operating point and input QC move when the same
images look as if another site had taken them? Each image is perturbed once (seeded):

- a tone curve (gamma 0.7-1.45) and a contrast stretch;
- 4x upsampling, then a blur (40% of images) or an unsharp mask (30%): other processing;
- a border crop of up to 6%, and for 30% of images a wider field with collimator shutters
  (white or black), then JPEG at quality 40-92 (another encoder);

then decoded and preprocessed exactly as the clinic does. Both passes go through the clinic's
own path (`train.evaluate.evaluate`: QC, intended population, OOD), so the withheld counts are
printed beside the metrics. Ratios and differences are measured in the same run.

    .venv/bin/python benchmarks/stress_eval.py --model RUN/model.onnx \
        --config configs/cxr/kermany.yaml
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from diagnostics.data.config import parse_dataset_config
from diagnostics.data.cxr import load_dataset
from diagnostics.imaging import decode
from diagnostics.train.config import load_train_config
from diagnostics.train.evaluate import evaluate


def perturb(pixels: np.ndarray, rng: np.random.Generator) -> bytes:
    """A decoded image (H, W) in [0, 1] as another site might have sent it: JPEG bytes."""
    x = np.clip(pixels, 0, 1) ** rng.uniform(0.7, 1.45)
    lo, hi = rng.uniform(0, 0.06), rng.uniform(0.94, 1.0)
    x = np.clip((x - lo) / (hi - lo), 0, 1)
    im = Image.fromarray((x * 255).round().astype(np.uint8))
    big = im.resize((im.width * 4, im.height * 4), Image.Resampling.BICUBIC)
    r = rng.uniform()
    if r < 0.4:
        big = big.filter(ImageFilter.GaussianBlur(rng.uniform(2, 5)))
    elif r < 0.7:
        radius, percent = rng.uniform(3, 8), int(rng.uniform(60, 160))
        big = big.filter(ImageFilter.UnsharpMask(radius=radius, percent=percent, threshold=2))
    m = int(rng.uniform(0, 0.06) * big.width)
    if m:
        big = big.crop((m, m, big.width - m, big.height - m))
    if rng.uniform() < 0.3:  # a wider field with collimator shutters, white or black
        w, h = big.size
        frame = Image.new(
            "L",
            (int(w * rng.uniform(1.1, 1.4)), int(h * rng.uniform(1.05, 1.3))),
            int(rng.choice([0, 235, 255])),
        )
        frame.paste(big, ((frame.width - w) // 2, (frame.height - h) // 2))
        big = frame
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=int(rng.uniform(40, 92)))
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", required=True, help="a config with a data: section")
    parser.add_argument("--split", default="val")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data_cfg = load_train_config(args.config).data
    table = load_dataset(data_cfg)
    frame = table.frame[table.frame["split"] == args.split]
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for i, row in enumerate(frame.itertuples()):
            path = Path(tmp) / f"{i:05d}.jpg"
            path.write_bytes(perturb(decode(row.path).pixels, rng))
            rows.append({"path": path.name, **{f: getattr(row, f) for f in table.findings}})
        pd.DataFrame(rows).to_csv(Path(tmp) / "stressed.csv", index=False)
        stressed_cfg = parse_dataset_config(
            {
                "source": "manifest",
                "labels_file": str(Path(tmp) / "stressed.csv"),
                "label_columns": {f: f for f in table.findings},
                "split": {"fractions": {args.split: 1.0}},
            }
        )
        runs = {
            "as is": evaluate(args.model, data_cfg, split=args.split, n_boot=0, progress=False),
            "shifted": evaluate(
                args.model, stressed_cfg, split=args.split, n_boot=0, progress=False
            ),
        }
    print(f"{args.model}: {args.config} split {args.split}, {len(frame)} images")
    head = f"{'':<10}{'finding':<12}{'n':>6}{'AUROC':>8}{'sens':>7}{'spec':>7}{'ECE':>7}"
    print(head + "  withheld")
    for name, r in runs.items():
        qc = r["qc"]
        reasons = ", ".join(f"{k} {v}" for k, v in qc["withheld_by_reason"].items()) or "none"
        for f, m in r["findings"].items():
            print(
                f"{name:<10}{f:<12}{int(m['n']):>6}{m['auroc']:>8.4f}{m['sensitivity']:>7.3f}"
                f"{m['specificity']:>7.3f}{m['ece']:>7.3f}  {qc['withheld']} ({reasons})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
