"""Decode cost of real radiographs, measured in one run: medians and ratios to the baseline.

Baseline: the uncompressed real chest CR (1955 x 1841, 15 bits). Each file is decoded by
`diagnostics.imaging.decode` from bytes already in memory (no disk I/O in the timing), then
preprocessed to 224 px; then the same with `decode(..., target=224)` (decoded at the model's
resolution: JPEG 2000 at a reduced level, the rest box-averaged), preprocessed with its geometry.
Needs ../shared/data.

    .venv/bin/python benchmarks/decode.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from timing import median_ms  # benchmarks/timing.py (scripts run from this folder)

from diagnostics.contract import PreprocessSpec
from diagnostics.imaging import decode, preprocess

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = [
    ("DICOM uncompressed (baseline)", "dicom/pydicom-data_RG1_UNCR.dcm"),
    ("DICOM JPEG 2000 lossless", "dicom/pydicom-data_RG1_J2KR.dcm"),
    ("DICOM JPEG-LS near-lossless", "dicom/WG04_RG1_JLSN.dcm"),
    ("DICOM RLE (1760 x 1760)", "dicom/WG04_RG3_RLE.dcm"),
    ("PNG 8-bit 1024 x 1024 (NIH)", "cxr/nih_sample/images/00000211_013.png"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent (real data lives in ../shared/data)")
        return 0
    spec = PreprocessSpec(size=224)
    rows = []
    for label, rel in FILES:
        data = (DATA / rel).read_bytes()
        dec = median_ms(lambda d=data: decode(d), args.repeat)
        pixels = decode(data).pixels
        pre = median_ms(lambda p=pixels: preprocess(p, spec), args.repeat)
        red = median_ms(lambda d=data: decode(d, target=spec.size), args.repeat)
        image = decode(data, target=spec.size)
        pre_red = median_ms(
            lambda i=image: preprocess(i.pixels, spec, geometry=i.geometry), args.repeat
        )
        rows.append((label, dec, pre, red, pre_red))
    base = rows[0][1]
    print(f"median of {args.repeat} runs, 1 process")
    print(
        f"{'input':<32}{'decode ms':>11}{'x baseline':>12}{'preprocess->224 ms':>20}"
        f"{'decode target=224':>19}{'preprocess':>12}"
    )
    for label, dec, pre, red, pre_red in rows:
        print(f"{label:<32}{dec:>11.1f}{dec / base:>12.2f}{pre:>20.1f}{red:>19.1f}{pre_red:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
