"""Tabular risk models: scikit-learn Pipelines with every preprocessing step inside.

`ColumnTransformer` (median impute + scale for numeric, most-frequent impute + one-hot for
categorical, most-frequent impute for binary) -> `CalibratedClassifierCV(estimator)`. `fit`
returns self and `predict_proba` gives calibrated risks, as the sklearn contract says.
"""

from __future__ import annotations

from typing import Any

from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

ESTIMATORS = ("logistic", "hist_gradient_boosting", "random_forest")


def make_estimator(name: str, params: dict[str, Any] | None = None, seed: int = 0) -> Any:
    params = dict(params or {})
    try:
        return _make(name, params, seed)
    except TypeError as exc:  # a parameter another estimator takes (C for logistic, ...)
        raise ValueError(f"model.params {sorted(params)} do not fit {name}: {exc}") from None


def _make(name: str, params: dict[str, Any], seed: int) -> Any:
    if name == "logistic":
        return LogisticRegression(max_iter=2000, **params)  # L2 by default
    if name == "hist_gradient_boosting":
        return HistGradientBoostingClassifier(random_state=seed, **params)
    if name == "random_forest":
        return RandomForestClassifier(random_state=seed, n_estimators=300, **params)
    raise KeyError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")


def make_pipeline(
    numeric: list[str],
    categorical: list[str],
    binary: list[str],
    estimator: str = "logistic",
    params: dict[str, Any] | None = None,
    calibration: str = "sigmoid",
    cv: int = 5,
    seed: int = 0,
) -> Pipeline:
    transformers = []
    if numeric:
        transformers.append(
            (
                "num",
                Pipeline(
                    [("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())]
                ),
                numeric,
            )
        )
    if categorical:
        transformers.append(
            # categorical values are strings, "" = missing (as the ONNX string inputs carry it)
            (
                "cat",
                Pipeline(
                    [
                        ("impute", SimpleImputer(missing_values="", strategy="most_frequent")),
                        ("onehot", OneHotEncoder(handle_unknown="ignore")),
                    ]
                ),
                categorical,
            )
        )
    if binary:
        transformers.append(("bin", SimpleImputer(strategy="most_frequent"), binary))
    prep = ColumnTransformer(transformers, remainder="drop", sparse_threshold=0.0)
    # ensemble=False: one model on all rows, calibrated on its cross-validated predictions.
    # Averaging k calibrated fold models (the default) shrinks risks towards the mean
    # (calibration slope > 1: measured 1.27 against 1.0x on Cleveland).
    model = CalibratedClassifierCV(
        make_estimator(estimator, params, seed), method=calibration, cv=cv, ensemble=False
    )
    return Pipeline([("prep", prep), ("model", model)])
