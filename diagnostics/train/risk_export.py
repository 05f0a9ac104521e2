"""A fitted risk pipeline as ONNX (skl2onnx, one named input per feature, metadata embedded),
shipped only when ONNX Runtime reproduces scikit-learn's probabilities.

Two converters are registered here on top of skl2onnx 1.20 (`register_converters`):

- `SplineTransformer` (skl2onnx has none): the B-spline basis by the Cox-de Boor recursion in
  double precision, constant beyond the training range as sklearn's extrapolation="constant".
- isotonic calibration: skl2onnx maps a score to the y of the *nearest* isotonic threshold
  (differences up to 0.08); sklearn interpolates linearly between thresholds. Its
  `_transform_isotonic` is replaced by `_isotonic_interp`: clip, find the segment, interpolate.
- `HistGradientBoostingClassifier`: skl2onnx's own converter, with its integer attributes made
  plain ints. It builds `nodes_missing_value_tracks_true` from Python `False` (leaves) and
  `np.uint8` (splits); protobuf refuses a bool in a repeated int64 field ("Expected an int, got
  a boolean"), which skl2onnx reports as "Unable to create node 'TreeEnsembleClassifier'". The
  np.uint32/np.int64 ids shown in that message are accepted as they are.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diagnostics.contract import METADATA_KEY, ModelMetadata
from diagnostics.tables import TableSchema

PARITY_TOLERANCE = 1e-5
_REGISTERED: list[bool] = []


class _PlainIntAttributes:
    """A converter container whose nodes get integer-list attributes as Python ints."""

    def __init__(self, container: Any) -> None:
        self._container = container

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)

    def add_node(self, *args: Any, **attrs: Any) -> Any:
        for key, value in attrs.items():
            if (
                isinstance(value, list)
                and value
                and all(isinstance(v, numbers.Integral) for v in value)  # bool, np.uint8 too
            ):
                attrs[key] = [int(v) for v in value]
        return self._container.add_node(*args, **attrs)


def _convert_hgb_classifier(scope: Any, operator: Any, container: Any) -> None:
    from skl2onnx.operator_converters.random_forest import (
        convert_sklearn_random_forest_classifier,
    )

    op = operator.raw_operator
    if any(node["is_categorical"] for trees in op._predictors for t in trees for node in t.nodes):
        raise NotImplementedError("categorical splits of HistGradientBoosting do not convert")
    convert_sklearn_random_forest_classifier(scope, operator, _PlainIntAttributes(container))


def _spline_shape(operator: Any) -> None:
    from skl2onnx.common.data_types import FloatTensorType

    n = operator.inputs[0].get_first_dimension()
    operator.outputs[0].type = FloatTensorType([n, operator.raw_operator.n_features_out_])


def _inverse(span: np.ndarray) -> np.ndarray:
    """1/span, and 0 where knots repeat (the Cox-de Boor convention 0/0 = 0)."""
    out = np.zeros_like(span)
    np.divide(1.0, span, out=out, where=span > 0)
    return out


def _graph(scope: Any, container: Any) -> tuple[Any, Any]:
    """`const(base, value, dtype=DOUBLE)` (an initializer) and `node(op_type, inputs, **attrs)`
    (one output), each returning its output's unique name: what the converters below build
    their ONNX subgraphs with."""
    from onnx import TensorProto

    def const(base: str, value: np.ndarray, dtype: int = TensorProto.DOUBLE) -> str:
        arr = np.asarray(value)
        out = scope.get_unique_variable_name(base)
        container.add_initializer(out, dtype, list(arr.shape), arr.ravel().tolist())
        return out

    def node(op_type: str, inputs: list[str], **attrs: Any) -> str:
        out = scope.get_unique_variable_name(op_type.lower())
        container.add_node(
            op_type, inputs, [out], name=scope.get_unique_operator_name(op_type), **attrs
        )
        return out

    return const, node


def _convert_spline(scope: Any, operator: Any, container: Any) -> None:
    """B-spline basis of every column at once: x (N, F, 1) against knots (F, m)."""
    from onnx import TensorProto

    op = operator.raw_operator
    if op.extrapolation != "constant" or not op.include_bias or op.degree < 1:
        raise NotImplementedError(
            "only SplineTransformer(extrapolation='constant', include_bias=True, degree >= 1) "
            f"converts, not {op!r}"
        )
    k = int(op.degree)
    knots = np.stack([np.asarray(s.t, dtype=np.float64) for s in op.bsplines_])  # (F, m)
    n_feat, m = knots.shape
    n_splines = m - k - 1

    const, node = _graph(scope, container)

    x = node("Cast", [operator.inputs[0].full_name], to=TensorProto.DOUBLE)
    x = node("Unsqueeze", [x, const("axis2", np.array([2]), TensorProto.INT64)])  # (N, F, 1)
    # constant extrapolation == the basis at the nearest end of the training range
    xmax = const("xmax", knots[:, m - k - 1 : m - k])
    x = node("Max", [x, const("xmin", knots[:, k : k + 1])])
    x = node("Min", [x, xmax])
    inside = node(
        "And",
        [
            node("GreaterOrEqual", [x, const("t_lo", knots[:, :-1])]),
            node("Less", [x, const("t_hi", knots[:, 1:])]),
        ],
    )
    # at x == xmax scipy evaluates on interval n - 1 (closed on the right; with repeated end
    # knots that interval is empty and every basis is 0, as sklearn gives)
    last = np.zeros((n_feat, m - 1), dtype=bool)
    last[:, m - k - 2] = True
    at_end = node("Equal", [x, xmax])  # ORT has no bool Where: (end & last) | (!end & inside)
    inside = node(
        "Or",
        [
            node("And", [at_end, const("last", last, TensorProto.BOOL)]),
            node("And", [node("Not", [at_end]), inside]),
        ],
    )
    basis = node("Cast", [inside], to=TensorProto.DOUBLE)  # degree 0: (N, F, m - 1)
    axis = const("axis", np.array([2]), TensorProto.INT64)
    for d in range(1, k + 1):
        w = m - 1 - d
        left = node(
            "Mul",
            [
                node("Sub", [x, const("t_j", knots[:, :w])]),
                const("inv_l", _inverse(knots[:, d : d + w] - knots[:, :w])),
            ],
        )
        right = node(
            "Mul",
            [
                node("Sub", [const("t_jd1", knots[:, d + 1 : d + 1 + w]), x]),
                const("inv_r", _inverse(knots[:, d + 1 : d + 1 + w] - knots[:, 1 : 1 + w])),
            ],
        )
        lo = node(
            "Slice",
            [
                basis,
                const("s0", np.array([0]), TensorProto.INT64),
                const("e0", np.array([w]), TensorProto.INT64),
                axis,
            ],
        )
        hi = node(
            "Slice",
            [
                basis,
                const("s1", np.array([1]), TensorProto.INT64),
                const("e1", np.array([w + 1]), TensorProto.INT64),
                axis,
            ],
        )
        basis = node("Add", [node("Mul", [left, lo]), node("Mul", [right, hi])])
    flat = node(
        "Reshape", [basis, const("shape", np.array([-1, n_feat * n_splines]), TensorProto.INT64)]
    )
    container.add_node(
        "Cast",
        [flat],
        [operator.outputs[0].full_name],
        name=scope.get_unique_operator_name("Cast"),
        to=TensorProto.FLOAT,
    )


def _isotonic_interp(
    scope: Any, container: Any, model: Any, T: str, k: int, dtype: Any, proto_type: int
) -> str:
    """sklearn's IsotonicRegression(out_of_bounds="clip").predict: np.interp on
    (X_thresholds_, y_thresholds_) of calibrator k, in double precision. Returns (N, 1)."""
    from onnx import TensorProto

    calibrators = getattr(model, "calibrators", None) or model.calibrators_
    iso = calibrators[k]
    xs = np.asarray(iso.X_thresholds_, dtype=np.float64)
    ys = np.asarray(iso.y_thresholds_, dtype=np.float64)
    out_type = proto_type if proto_type in (TensorProto.FLOAT, TensorProto.DOUBLE) else 1

    const, node = _graph(scope, container)

    def i64(base: str, value: list[int]) -> str:
        return const(base, np.array(value), TensorProto.INT64)

    t = node("Reshape", [node("Cast", [T], to=TensorProto.DOUBLE), i64("shape", [-1, 1])])
    if len(xs) == 1:  # a constant calibrator
        y = node("Add", [node("Mul", [t, const("zero", np.array(0.0))]), const("y0", ys[:1])])
        return node("Cast", [y], to=out_type)
    t = node("Min", [node("Max", [t, const("xmin", xs[:1])]), const("xmax", xs[-1:])])
    # segment j: the last threshold <= t, at most len - 2
    count = node(
        "ReduceSum",
        [node("Cast", [node("LessOrEqual", [const("xs", xs), t])], to=TensorProto.INT64),
         i64("axes", [1])],
        keepdims=1,
    )  # fmt: skip
    j = node("Sub", [count, i64("one", [1])])
    j = node("Min", [node("Max", [j, i64("lo", [0])]), i64("hi", [len(xs) - 2])])
    j1 = node("Add", [j, i64("one", [1])])
    x0, x1 = node("Gather", [const("xg", xs), j]), node("Gather", [const("xg", xs), j1])
    y0, y1 = node("Gather", [const("yg", ys), j]), node("Gather", [const("yg", ys), j1])
    slope = node("Div", [node("Sub", [y1, y0]), node("Sub", [x1, x0])])
    y = node("Add", [node("Mul", [slope, node("Sub", [t, x0])]), y0])
    return node("Cast", [y], to=out_type)


def register_converters() -> None:
    """Teach skl2onnx SplineTransformer and the fixed HGB classifier (idempotent)."""
    if _REGISTERED:
        return
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import calculate_linear_classifier_output_shapes
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.preprocessing import SplineTransformer

    update_registered_converter(
        SplineTransformer, "DiagnosticsSplineTransformer", _spline_shape, _convert_spline
    )
    update_registered_converter(
        HistGradientBoostingClassifier,
        "DiagnosticsHistGradientBoostingClassifier",
        calculate_linear_classifier_output_shapes,
        _convert_hgb_classifier,
        options={
            "zipmap": [True, False, "columns"],
            "raw_scores": [True, False],
            "output_class_labels": [False, True],
            "nocl": [True, False],
        },
    )
    from skl2onnx.operator_converters import calibrated_classifier_cv

    # looked up by name at conversion time by skl2onnx's CalibratedClassifierCV converter
    calibrated_classifier_cv._transform_isotonic = _isotonic_interp
    _REGISTERED.append(True)


def export_risk_onnx(pipeline: Any, schema: TableSchema, meta: ModelMetadata, path: Path) -> Path:
    """skl2onnx export with one named input per feature; metadata embedded."""
    import onnx
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    register_converters()
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
