"""A synthetic table shaped as the OUCRU dengue file (1/2 codes, SiteNo, StudyNo), and a small
risk model trained from it by the project's own `train_risk`: for the clinic-side tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# The dengue_vn_cbc schema, with one yes/no symptom: as the published file codes it (with the
# FHIR codes of configs/risk/dengue_vn_cbc.yaml).
SCHEMA: dict[str, Any] = {
    "name": "synthetic_dengue",
    "site_column": "SiteNo",
    "patient_column": "StudyNo",
    "population": {"Age": [1, 15], "DayDisease": [1, 3]},
    "outcome": {
        "column": "Lab_Confirmed_Dengue",
        "codes": {"yes": 1, "no": 2},
        "label": "dengue",
        "definition": ["PCR", "NS1_ELISA", "Lab_Confirmed_Dengue"],
    },
    "features": [
        {
            "name": "Age",
            "type": "numeric",
            "unit": "years",
            "range": [1, 15],
            "fhir": {"codes": ["http://loinc.org|30525-0"], "patient": "age"},
        },
        {
            "name": "WBC",
            "type": "numeric",
            "unit": "10^9/L",
            "range": [0.3, 100],
            "fhir": {"codes": ["http://loinc.org|6690-2"]},
        },
        {
            "name": "PLT",
            "type": "numeric",
            "unit": "10^9/L",
            "range": [5, 1500],
            "fhir": {"codes": ["http://loinc.org|777-3"]},
        },
        {"name": "DayDisease", "type": "numeric", "unit": "day of illness", "range": [1, 3]},
        {"name": "Vomiting", "type": "binary", "codes": {"yes": 1, "no": 2}},
    ],
}


def synthetic_dengue(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """Febrile children: dengue more likely with low white cells and platelets."""
    rng = np.random.default_rng(seed)
    age = rng.integers(1, 16, n)
    wbc = np.round(rng.lognormal(1.9, 0.4, n), 1)
    plt = np.round(rng.lognormal(5.3, 0.35, n))
    day = rng.integers(1, 4, n)
    vomit = rng.integers(1, 3, n)
    logit = 1.5 - 0.25 * wbc - 0.006 * (plt - 200) + 0.05 * age + 0.4 * (vomit == 1)
    dengue = rng.random(n) < 1 / (1 + np.exp(-logit))
    return pd.DataFrame(
        {
            "SiteNo": rng.choice([1, 2, 3], n),
            "StudyNo": [f"S{i:05d}" for i in range(n)],
            "Age": age,
            "WBC": wbc,
            "PLT": plt,
            "DayDisease": day,
            "Vomiting": vomit,
            "Lab_Confirmed_Dengue": np.where(dengue, 1, 2),
        }
    )


def train_synthetic_dengue(folder: Path) -> Path:
    """The exported ONNX model (logistic regression, sigmoid calibration), trained in `folder`."""
    from diagnostics.train.risk import RiskTrainConfig, train_risk
    from tests.conftest import diagnostics_home

    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "dengue.csv"
    synthetic_dengue().to_csv(table, index=False)
    cfg = RiskTrainConfig.model_validate(
        {
            "name": "dengue-synth",
            "table": str(table),
            "schema": SCHEMA,
            "model": {"estimator": "logistic", "calibration": "sigmoid", "calibration_cv": 3},
            "eval": {"bootstrap": 0},
            "tracking": {"registered_model": None},
        }
    )
    with diagnostics_home(folder / "home"):
        return train_risk(cfg, log_to_mlflow=False).onnx_path
