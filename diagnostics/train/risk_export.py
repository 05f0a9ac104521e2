"""A fitted risk pipeline as ONNX (skl2onnx, one named input per feature, metadata embedded),
shipped only when ONNX Runtime reproduces scikit-learn's probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diagnostics.contract import METADATA_KEY, ModelMetadata
from diagnostics.tables import TableSchema

PARITY_TOLERANCE = 1e-5


def export_risk_onnx(pipeline: Any, schema: TableSchema, meta: ModelMetadata, path: Path) -> Path:
    """skl2onnx export with one named input per feature; metadata embedded."""
    import onnx
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    inputs = [
        (
            f.name,
            StringTensorType([None, 1]) if f.type == "categorical" else FloatTensorType([None, 1]),
        )
        for f in schema.features
    ]
    try:
        proto = to_onnx(
            pipeline,
            initial_types=inputs,
            target_opset={"": 17, "ai.onnx.ml": 3},
            options={id(pipeline.steps[-1][1]): {"zipmap": False}},
        )
    except Exception as exc:  # skl2onnx dumps whole tree tables into its messages: keep the start
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise RuntimeError(
            f"{meta.architecture} cannot be converted to ONNX ({first}...); no file is shipped. "
            "Use estimator: logistic with calibration: sigmoid, which converts exactly."
        ) from exc
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def onnx_feed(X: pd.DataFrame, schema: TableSchema) -> dict[str, np.ndarray]:
    """Records -> one (N, 1) array per named input (strings for categorical features)."""
    feed = {}
    for f in schema.features:
        col = X[f.name]
        if f.type == "categorical":
            feed[f.name] = col.astype(object).where(col.notna(), "").astype(str).to_numpy()[:, None]
            feed[f.name] = feed[f.name].astype(object)
        else:
            feed[f.name] = col.astype(np.float32).to_numpy()[:, None]
    return feed


def onnx_risk(path: Path, X: pd.DataFrame, schema: TableSchema) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, onnx_feed(X, schema))
    return np.asarray(out[1], dtype=np.float64)[:, 1]


@dataclass
class RiskExport:
    onnx_path: Path
    sha256: str
    parity: float  # max |p_sklearn - p_onnx| on the checked records


def export_checked(
    pipeline: Any,
    schema: TableSchema,
    meta: ModelMetadata,
    path: Path,
    X: pd.DataFrame,
    p_sklearn: np.ndarray,
) -> RiskExport:
    """Export, then score `X` with ONNX Runtime: a file that disagrees with scikit-learn's
    probabilities `p_sklearn` by more than PARITY_TOLERANCE is deleted, and this raises."""
    from diagnostics.contract import file_sha256

    onnx_path = export_risk_onnx(pipeline, schema, meta, path)
    parity = float(np.abs(onnx_risk(onnx_path, X, schema) - p_sklearn).max())
    if not parity <= PARITY_TOLERANCE:
        onnx_path.unlink()
        raise RuntimeError(
            f"ONNX and sklearn disagree by {parity:.2e} (> {PARITY_TOLERANCE:.0e}): "
            "not shipped. "
            "Isotonic calibration and some estimators do not convert exactly: use "
            "estimator: logistic with calibration: sigmoid."
        )
    return RiskExport(onnx_path, file_sha256(onnx_path), parity)
