"""Risk scoring speed: ONNX Runtime against scikit-learn `predict_proba`, in rows/s.

Single records (one call per row, as a clinic form submits them) and batches of 10,000 rows,
measured in one run on the same rows. Trains the config's model first (no MLflow), then times
the exported ONNX file and the same sklearn pipeline, fitted the same way.

    .venv/bin/python benchmarks/risk_scoring.py [--config configs/risk/breast_cancer_demo.yaml]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np
from timing import median_ms  # benchmarks/timing.py (scripts run from this folder)


def rate(fn, rows: int, repeat: int) -> float:
    """Rows per second from the median time of `repeat` calls."""
    return rows / (median_ms(fn, repeat) / 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/risk/breast_cancer_demo.yaml")
    parser.add_argument("--single", type=int, default=300, help="single-record calls to time")
    args = parser.parse_args()

    import os

    from diagnostics.settings import get_settings
    from diagnostics.train.risk import load_risk_config, train_risk

    with tempfile.TemporaryDirectory() as home:
        os.environ["DIAGNOSTICS_HOME"] = home
        get_settings.cache_clear()
        cfg = load_risk_config(args.config, ["eval.bootstrap=0"])
        result = train_risk(cfg, log_to_mlflow=False)
        from diagnostics.serve.risk import RiskModel

        X = result.table.X
        rng = np.random.default_rng(0)
        big = X.iloc[rng.integers(0, len(X), 10_000)].reset_index(drop=True)
        scorer = RiskModel(result.onnx_path, threads=2)
        pipe = result.pipeline  # the fitted pipeline the ONNX file reproduces
        singles = [X.iloc[[i % len(X)]] for i in range(args.single)]

        def ort_single() -> None:
            for row in singles:
                scorer.predict(row)

        def skl_single() -> None:
            for row in singles:
                pipe.predict_proba(row)

        rows = [
            ("single record", rate(skl_single, len(singles), 3), rate(ort_single, len(singles), 3)),
            (
                "batch of 10,000",
                rate(lambda: pipe.predict_proba(big), len(big), 5),
                rate(lambda: scorer.predict(big), len(big), 5),
            ),
        ]
    print(f"{cfg.name}: {cfg.model.estimator} + {cfg.model.calibration}, {len(X.columns)} features")
    print(f"{'':<18}{'sklearn rows/s':>16}{'ORT rows/s':>14}{'ORT / sklearn':>15}")
    for name, skl, ort in rows:
        print(f"{name:<18}{skl:>16,.0f}{ort:>14,.0f}{ort / skl:>14.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
