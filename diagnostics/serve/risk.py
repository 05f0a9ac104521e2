"""Scoring clinical records with an exported risk model. Torch-free, and without sklearn.

Each record is validated against the schema inside the model file before scoring. A record that
fails is written with its reasons, a refusal code and no risk: there is never a silent default.
A record outside the model's intended population is refused (`outside_intended_population`).
Missing values that the schema allows are imputed by the model, and the output names them per row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from diagnostics.contract import ModelMetadata, file_sha256, is_positive
from diagnostics.tables import TableSchema, validate_records


class RiskModel:
    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

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

    def score(self, records: pd.DataFrame) -> pd.DataFrame:
        """One output row per input row: risk, category, imputed features, or rejection reasons."""
        vt = validate_records(records, self.schema, require_outcome=False)
        risk = self.predict(vt.X)
        if not np.isfinite(risk).all():
            raise ValueError("the model produced a non-finite risk; nothing was written")
        # row: 0-based data row of the input (header excluded); key columns are carried through
        out = pd.DataFrame({"row": np.arange(len(records))})
        for key in (self.schema.patient_column, self.schema.site_column):
            if key and key in records.columns:
                out[key] = records[key].to_numpy()
        out = out.assign(
            status="rejected", risk=np.nan, category="", imputed="", code="", reasons=""
        )
        for i, reasons in vt.rejected.items():
            out.loc[i, "reasons"] = "; ".join(reasons)
            # stable refusal code, e.g. outside_intended_population (tables.REFUSAL_CODES)
            out.loc[i, "code"] = vt.codes.get(i, "")
        missing = vt.X.isna() | (vt.X == "")
        for k, i in enumerate(vt.rows):
            out.loc[i, ["status", "risk"]] = ["scored", float(risk[k])]
            out.loc[i, "category"] = "high" if is_positive(risk[k], self.threshold) else "low"
            out.loc[i, "imputed"] = ", ".join(c for c in vt.X.columns if missing.iloc[k][c])
        out["threshold"] = self.threshold
        out["model_sha256"] = self.sha256
        return out
