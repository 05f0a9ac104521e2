"""Scoring clinical records with an exported risk model. Torch-free, and without sklearn.

Each record is validated against the schema inside the model file before scoring. A record that
fails is written with its reasons, a refusal code and no risk: there is never a silent default.
A record outside the model's intended population is refused (`outside_intended_population`).
Missing values that the schema allows are imputed by the model, and the output names them per row.

A site profile (`models recalibrate` on the site's own labelled rows) recalibrates the model's
probability for that site: p' = sigmoid(logit(p) / T + b), with the site's own threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diagnostics.contract import ModelMetadata, file_sha256, is_positive
from diagnostics.tables import TableSchema, validate_records

# p is clipped to [RECAL_CLIP, 1 - RECAL_CLIP] before its logit (+-13.8): a model output of
# exactly 0 or 1 still maps to a finite logit. The fit (train/recalibrate_risk) clips the same.
RECAL_CLIP = 1e-6


def recalibrate_probability(p: np.ndarray, temperature: float, intercept: float) -> np.ndarray:
    """A site's logistic recalibration of a risk model's probability:
    sigmoid(logit(p) / temperature + intercept), float64; NaN stays NaN.

    Monotone increasing in p (temperature > 0), so it never changes the ranking (AUROC)."""
    t, b = float(temperature), float(intercept)
    if not (np.isfinite(t) and t > 0) or not np.isfinite(b):
        raise ValueError(
            f"a site recalibration needs a temperature > 0 and a finite intercept "
            f"(got {temperature}, {intercept})"
        )
    q = np.clip(np.asarray(p, dtype=np.float64), RECAL_CLIP, 1 - RECAL_CLIP)
    z = np.log(q) - np.log1p(-q)  # logit, |z| <= 13.8
    return 1.0 / (1.0 + np.exp(-(z / t + b)))


def _profile_entry(profile: Any, label: str) -> tuple[float, float, float | None] | None:
    """(temperature, intercept, threshold or None) for `label` from a site profile, or None when
    the profile has no entry for it (then the model's own calibration and threshold apply)."""
    if profile is None:
        return None
    temps = getattr(profile, "temperatures", None) or {}
    intercepts = getattr(profile, "intercepts", None) or {}
    thresholds = getattr(profile, "thresholds", None) or {}
    if label not in temps and label not in intercepts and label not in thresholds:
        return None
    thr = thresholds.get(label)
    return (
        float(temps.get(label, 1.0)),
        float(intercepts.get(label, 0.0)),
        None if thr is None else float(thr),
    )


class RiskModel:
    def __init__(
        self, path: str | Path, threads: int | None = None, version: str | None = None
    ) -> None:
        import onnxruntime as ort

        self.version = version  # the registry version it was resolved from, if any
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.sha256 = file_sha256(self.path)
        self.session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self.metadata = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map)
        if self.metadata.task != "risk" or self.metadata.table_schema is None:
            raise ValueError(f"{self.path.name} is not a risk model (task {self.metadata.task})")
        self.schema = TableSchema.model_validate(self.metadata.table_schema)
        self.label = self.metadata.labels[0]
        self.threshold = self.metadata.thresholds[self.label].value

    def feed(self, X: pd.DataFrame) -> dict[str, np.ndarray]:
        """Validated features -> one (N, 1) input per feature, as the ONNX graph names them."""
        out: dict[str, np.ndarray] = {}
        for f in self.schema.features:
            col = X[f.name]
            if f.type == "categorical":
                out[f.name] = (
                    col.astype(object)
                    .where(col.notna(), "")
                    .astype(str)
                    .to_numpy(dtype=object)[:, None]
                )
            else:
                out[f.name] = col.astype(np.float32).to_numpy()[:, None]
        return out

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """Risk (probability of the outcome) for validated feature rows."""
        if len(X) == 0:
            return np.zeros(0)
        probs = self.session.run(None, self.feed(X))[1]
        return np.asarray(probs, dtype=np.float64)[:, 1]

    def score(self, records: pd.DataFrame, profile: Any = None) -> pd.DataFrame:
        """One output row per input row: risk, category, imputed features, or rejection reasons.

        `profile`: the site's profile (a `SiteProfile`: `.id`, `.temperatures`, `.intercepts`,
        `.thresholds`) or None. With an entry for the model's label, `risk` is the site's
        recalibrated probability and `threshold` the site's (the model's where the profile has
        none); `raw_risk` is always the model's own probability and `profile_id` says which
        profile applied (None: the model's own)."""
        vt = validate_records(records, self.schema, require_outcome=False)
        raw = self.predict(vt.X)
        if not np.isfinite(raw).all():
            raise ValueError("the model produced a non-finite risk; nothing was written")
        entry = _profile_entry(profile, self.label)
        threshold, profile_id, risk = self.threshold, None, raw
        if entry is not None:
            temperature, intercept, site_threshold = entry
            risk = recalibrate_probability(raw, temperature, intercept)
            threshold = self.threshold if site_threshold is None else site_threshold
            profile_id = int(profile.id) if profile.id is not None else None
        # row: 0-based data row of the input (header excluded); key columns are carried through
        out = pd.DataFrame({"row": np.arange(len(records))})
        for key in (self.schema.patient_column, self.schema.site_column):
            if key and key in records.columns:
                out[key] = records[key].to_numpy()
        out = out.assign(
            status="rejected",
            risk=np.nan,
            raw_risk=np.nan,
            category="",
            imputed="",
            code="",
            reasons="",
        )
        for i, reasons in vt.rejected.items():
            out.loc[i, "reasons"] = "; ".join(reasons)
            # stable refusal code, e.g. outside_intended_population (tables.REFUSAL_CODES)
            out.loc[i, "code"] = vt.codes.get(i, "")
        missing = vt.X.isna() | (vt.X == "")
        for k, i in enumerate(vt.rows):
            out.loc[i, ["status", "risk", "raw_risk"]] = ["scored", float(risk[k]), float(raw[k])]
            out.loc[i, "category"] = "high" if is_positive(risk[k], threshold) else "low"
            out.loc[i, "imputed"] = ", ".join(c for c in vt.X.columns if missing.iloc[k][c])
        out["threshold"] = threshold
        out["model_sha256"] = self.sha256
        out["profile_id"] = pd.Series([profile_id] * len(out), index=out.index, dtype=object)
        return out
