"""Tabular risk models: scikit-learn Pipelines with every preprocessing step inside.

`ColumnTransformer` (median impute + a numeric transform for numeric features, most-frequent
impute + one-hot for categorical, most-frequent impute for binary) ->
`CalibratedClassifierCV(estimator)`. `fit` returns self and `predict_proba` gives calibrated
risks, as the sklearn contract says.

The numeric transform lets a linear model bend (Age, WBC and PLT are not linear on the logit
scale): "linear" (scale, today's model), "bins" (quantile bins, one-hot) or "splines" (cubic
B-splines on quantile knots, constant beyond the training range). All three export to ONNX
exactly (`diagnostics.train.risk_export`; splines with its own converter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import (
    KBinsDiscretizer,
    OneHotEncoder,
    SplineTransformer,
    StandardScaler,
)

ESTIMATORS = ("logistic", "hist_gradient_boosting", "random_forest")
TREE_ESTIMATORS = ("hist_gradient_boosting", "random_forest")  # numeric "linear" = no scaling
# name -> its settings and their defaults
NUMERIC_TRANSFORMS: dict[str, dict[str, Any]] = {
    "linear": {},
    "bins": {"n_bins": 5},
    "splines": {"n_knots": 5, "degree": 3},
}


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


def numeric_step(spec: str | Mapping[str, Any] | None = "linear") -> Any:
    """The transform after median imputation of numeric features.

    `spec` is a name of NUMERIC_TRANSFORMS, or a mapping with `kind` and that kind's settings,
    e.g. {"kind": "splines", "n_knots": 4} or {"kind": "bins", "n_bins": 4}."""
    if spec is None:
        spec = "linear"
    if isinstance(spec, str):
        kind, settings = spec, {}
    elif isinstance(spec, Mapping):
        settings = dict(spec)
        kind = settings.pop("kind", None)
    else:
        raise ValueError(f"numeric_transform must be a name or a mapping, not {spec!r}")
    if kind not in NUMERIC_TRANSFORMS:
        raise ValueError(
            f"unknown numeric_transform {kind!r}; choose one of {', '.join(NUMERIC_TRANSFORMS)}"
        )
    unknown = sorted(set(settings) - set(NUMERIC_TRANSFORMS[kind]))
    if unknown:
        allowed = sorted(NUMERIC_TRANSFORMS[kind]) or "none"
        raise ValueError(
            f"numeric_transform {kind!r} does not take {unknown}; its settings: {allowed}"
        )
    opts = {**NUMERIC_TRANSFORMS[kind], **settings}
    if kind == "linear":
        return StandardScaler()
    if kind == "bins":
        # quantile edges; a feature with few distinct values gets fewer bins (sklearn warns)
        return KBinsDiscretizer(
            n_bins=int(opts["n_bins"]),
            encode="onehot-dense",
            strategy="quantile",
            quantile_method="averaged_inverted_cdf",
        )
    if int(opts["degree"]) < 1:
        raise ValueError("numeric_transform splines: degree must be at least 1")
    # extrapolation="constant" (the risk stays flat beyond the training range) is what the
    # ONNX converter in risk_export implements
    return SplineTransformer(
        n_knots=int(opts["n_knots"]),
        degree=int(opts["degree"]),
        knots="quantile",
        extrapolation="constant",
    )


def _step_name(step: Any) -> str:
    if isinstance(step, KBinsDiscretizer):
        return "bins"
    return "splines" if isinstance(step, SplineTransformer) else "scale"


def make_pipeline(
    numeric: list[str],
    categorical: list[str],
    binary: list[str],
    estimator: str = "logistic",
    params: dict[str, Any] | None = None,
    calibration: str = "sigmoid",
    cv: int = 5,
    seed: int = 0,
    numeric_transform: str | Mapping[str, Any] | None = "linear",
) -> Pipeline:
    step = numeric_step(numeric_transform)  # checked even without numeric features
    steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="median"))]
    if not (estimator in TREE_ESTIMATORS and isinstance(step, StandardScaler)):
        # Trees split on raw (imputed) values: scaling changes no split, and HGB's thresholds
        # are data values, so a scaled copy computed in float32 by ONNX Runtime would fall on
        # the other side of a tie (0.11 of probability on the dengue table).
        steps.append((_step_name(step), step))
    transformers = []
    if numeric:
        transformers.append(("num", Pipeline(steps), numeric))
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
