"""Risk model options (numeric transforms, HGB) and their exact ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from diagnostics.models.risk import make_pipeline, numeric_step
from diagnostics.tables import TableSchema
from tests.conftest import shared

DENGUE = ("clinical", "dengue_oucru_vn.csv")
DENGUE_BINARY = ["Sex", "Vomiting", "Abdo", "Muco", "Skin", "Flush", "Hepatomegaly", "Rash"]
DENGUE_BINARY += ["Injection"]
DENGUE_NUMERIC = ["Age", "DayDisease", "Temp", "BMI", "Height", "Weight", "WBC", "HCT", "PLT"]
DENGUE_NUMERIC += ["NEUCount", "LYMCount", "MONOCount", "ALB", "AST", "ALT", "CK"]

# (numeric_transform, estimator, params): every option that must export exactly
OPTIONS = [
    ("linear", "logistic", {}),
    ("bins", "logistic", {}),
    ({"kind": "bins", "n_bins": 4}, "logistic", {"C": 0.5}),
    ("splines", "logistic", {}),
    ({"kind": "splines", "n_knots": 4, "degree": 2}, "logistic", {}),
    ("linear", "hist_gradient_boosting", {"max_depth": 3, "learning_rate": 0.05, "max_iter": 60}),
]


def _schema(numeric: list[str], binary: list[str]) -> TableSchema:
    features = [{"name": c, "type": "numeric"} for c in numeric]
    features += [{"name": c, "type": "binary"} for c in binary]
    return TableSchema.model_validate(
        {
            "name": "t",
            "outcome": {"column": "y", "rule": "> 0", "label": "disease"},
            "features": features,
        }
    )


def _meta():
    from diagnostics.contract import ModelMetadata, Threshold

    return ModelMetadata(
        task="risk",
        name="test-risk",
        architecture="test",
        labels=["disease"],
        temperature=[1.0],
        thresholds={"disease": Threshold(value=0.5, policy="fixed")},
        created="2025-01-01T00:00:00Z",
        package_version="0",
    )


def _parity(
    X: pd.DataFrame,
    y: np.ndarray,
    numeric: list[str],
    binary: list[str],
    tmp_path: Path,
    transform,
    estimator: str,
    params: dict,
    calibration: str = "sigmoid",
) -> float:
    """Fit, export with the shipping check (raises above 1e-5) and return the parity."""
    from diagnostics.train.risk_export import export_checked

    pipe = make_pipeline(
        numeric, [], binary, estimator, params, calibration, 3, 0, numeric_transform=transform
    )
    pipe.fit(X, y)
    p = pipe.predict_proba(X)[:, 1]
    exported = export_checked(pipe, _schema(numeric, binary), _meta(), tmp_path / "m.onnx", X, p)
    return exported.parity


def _synthetic(n: int = 600, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Non-linear risk in `age` (U-shape) and `plt` (threshold), with missing values, ties and
    values repeated at the knots, as clinical tables have."""
    rng = np.random.default_rng(seed)
    age = rng.integers(1, 16, n).astype(float)
    plt = np.round(rng.lognormal(5.2, 0.5, n))
    wbc = np.round(rng.lognormal(1.8, 0.4, n), 2)
    day = rng.integers(1, 4, n).astype(float)  # 3 distinct values: repeated quantile knots
    rash = rng.integers(0, 2, n).astype(float)
    logit = 0.05 * (age - 8) ** 2 - 1.5 * (plt < 120) + 0.3 * wbc - 1 + 0.5 * rash
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    X = pd.DataFrame({"age": age, "plt": plt, "wbc": wbc, "day": day, "rash": rash})
    X.loc[rng.choice(n, 20, replace=False), "wbc"] = np.nan
    X.loc[rng.choice(n, 5, replace=False), "rash"] = np.nan
    return X, y


@pytest.mark.parametrize(("transform", "estimator", "params"), OPTIONS)
def test_options_export_exactly_on_a_synthetic_table(tmp_path, transform, estimator, params):
    X, y = _synthetic()
    parity = _parity(X, y, ["age", "plt", "wbc", "day"], ["rash"], tmp_path, transform,
                     estimator, params)  # fmt: skip
    assert parity <= 1e-5
    # records outside the training range (constant spline extrapolation, open-ended bins)
    from diagnostics.train.risk_export import onnx_risk

    pipe = make_pipeline(["age", "plt", "wbc", "day"], [], ["rash"], estimator, params,
                         "sigmoid", 3, 0, numeric_transform=transform)  # fmt: skip
    pipe.fit(X, y)
    from diagnostics.train.risk_export import export_risk_onnx

    path = export_risk_onnx(pipe, _schema(["age", "plt", "wbc", "day"], ["rash"]), _meta(),
                            tmp_path / "o.onnx")  # fmt: skip
    out = pd.DataFrame(
        {"age": [0.0, 30.0, 15.0, 1.0], "plt": [5.0, 2000.0, np.nan, 1.0],
         "wbc": [0.1, 60.0, 7.0, np.nan], "day": [0.0, 9.0, 3.0, 1.0],
         "rash": [1.0, 0.0, np.nan, 1.0]}
    )  # fmt: skip
    schema = _schema(["age", "plt", "wbc", "day"], ["rash"])
    assert np.abs(onnx_risk(path, out, schema) - pipe.predict_proba(out)[:, 1]).max() <= 1e-5


def test_hgb_converts_with_parity(tmp_path):
    """skl2onnx 1.20 alone fails on HGB (a bool in nodes_missing_value_tracks_true); the
    converter registered by risk_export converts it, raw score -> sigmoid calibrator."""
    X, y = _synthetic(seed=1)
    params = {"max_depth": 3, "learning_rate": 0.1, "max_iter": 100, "l2_regularization": 1.0}
    parity = _parity(X, y, ["age", "plt", "wbc", "day"], ["rash"], tmp_path, "linear",
                     "hist_gradient_boosting", params)  # fmt: skip
    assert parity <= 1e-5


def test_hgb_missing_values_follow_the_learned_branch(tmp_path):
    """A bare HGB (no imputer in front) sends NaN where sklearn does."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import HistGradientBoostingClassifier

    from diagnostics.train.risk_export import register_converters

    register_converters()
    X, y = _synthetic(seed=2)
    Xn = X.to_numpy(np.float32)
    model = HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(Xn, y)
    proto = to_onnx(model, Xn[:1], options={id(model): {"zipmap": False}},
                    target_opset={"": 17, "ai.onnx.ml": 3})  # fmt: skip
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    p_onnx = sess.run(None, {sess.get_inputs()[0].name: Xn})[1][:, 1]
    assert np.isnan(Xn).any()
    assert np.abs(p_onnx - model.predict_proba(Xn)[:, 1]).max() <= 1e-5


def test_unknown_numeric_transform_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown numeric_transform 'cubic'; choose one of"):
        make_pipeline(["a"], [], [], numeric_transform="cubic")
    with pytest.raises(ValueError, match=r"does not take \['n_knots'\]"):
        numeric_step({"kind": "bins", "n_knots": 3})
    with pytest.raises(ValueError, match="unknown numeric_transform None"):
        numeric_step({"n_bins": 3})


def test_default_keeps_todays_pipeline():
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(["a"], [], ["b"])
    num = pipe.named_steps["prep"].transformers[0][1]
    assert isinstance(num.named_steps["scale"], StandardScaler)


def _dengue() -> tuple[pd.DataFrame, np.ndarray]:
    raw = pd.read_csv(shared(*DENGUE))
    X = raw[DENGUE_NUMERIC + DENGUE_BINARY].astype(float)
    X[DENGUE_BINARY] = (X[DENGUE_BINARY] == 1).astype(float)  # 1 yes / 2 no -> 1 / 0
    return X, (raw["Lab_Confirmed_Dengue"] == 1).astype(int).to_numpy()


@pytest.mark.parametrize(("transform", "estimator", "params"), OPTIONS)
def test_options_export_exactly_on_the_dengue_table(tmp_path, transform, estimator, params):
    X, y = _dengue()
    parity = _parity(X, y, DENGUE_NUMERIC, DENGUE_BINARY, tmp_path, transform, estimator, params)
    assert parity <= 1e-5


def test_hgb_dengue_settings_export_exactly(tmp_path):
    X, y = _dengue()
    params = {"max_depth": 3, "learning_rate": 0.05, "max_iter": 200, "l2_regularization": 1.0}
    parity = _parity(X, y, DENGUE_NUMERIC, DENGUE_BINARY, tmp_path, "linear",
                     "hist_gradient_boosting", params)  # fmt: skip
    assert parity <= 1e-5
