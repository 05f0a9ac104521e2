"""Order 10 (early dengue in febrile children): yes/no codes, the intended population, the
outcome-definition rule, and leave-one-site-out evaluation on the OUCRU table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from diagnostics.tables import (
    OUTSIDE_POPULATION,
    POPULATION_UNKNOWN,
    SchemaError,
    TableSchema,
    validate_records,
)
from tests.conftest import REPO, shared

SPEC = {
    "name": "toy_dengue",
    "population": {"Age": [1, 15], "DayDisease": [1, 3]},
    "site_column": "SiteNo",
    "outcome": {
        "column": "Lab_Confirmed_Dengue",
        "codes": {"yes": 1, "no": 2},
        "definition": ["PCR", "NS1_ELISA", "Lab_Confirmed_Dengue"],
    },
    "features": [
        {"name": "Age", "type": "numeric", "unit": "years", "range": [0, 100]},
        {"name": "Sex", "type": "binary", "codes": {"yes": 2, "no": 1}},
        {"name": "Vomiting", "type": "binary", "codes": {"yes": 1, "no": 2}},
        {"name": "PLT", "type": "numeric", "unit": "10^9/L", "range": [5, 1500]},
    ],
}
SCHEMA = TableSchema.model_validate(SPEC)


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "SiteNo": [1, 1, 2, 2, 3, 3, 3],
            "Age": [5, 12, 16, 7, 0.5, None, 9],
            "DayDisease": [1, 3, 2, 5, 2, 2, None],
            "Sex": [1, 2, 1, 2, 1, 2, 1],
            "Vomiting": [1, 2, "", 1, 2, 1, 2],
            "PLT": [150, 90, 200, 210, 300, 250, 180],
            "Lab_Confirmed_Dengue": [1, 2, 1, 2, 2, 1, 2],
        }
    )


def test_yes_no_codes_become_one_and_zero():
    vt = validate_records(_frame().iloc[:2], SCHEMA)
    assert list(vt.X["Vomiting"]) == [1.0, 0.0]  # file 1 yes / 2 no
    assert list(vt.X["Sex"]) == [0.0, 1.0]  # file 1 male / 2 female -> female = 1
    assert list(vt.y) == [1.0, 0.0]  # outcome 1 yes / 2 no
    bad = _frame().iloc[:2].assign(Vomiting=[0, 1], Lab_Confirmed_Dengue=[1, 3])
    vt = validate_records(bad, SCHEMA)
    assert vt.rejected[0] == ["Vomiting: not one of ['1', '2']"]  # 0 is not a code here
    assert vt.rejected[1] == ["Lab_Confirmed_Dengue: outcome not an expected value"]
    # YAML 1.1 reads `yes:`/`no:` keys as booleans: they still work
    f = TableSchema.model_validate(
        SPEC | {"features": [{"name": "V", "type": "binary", "codes": {True: 1, False: 2}}]}
    ).features[0]
    assert f.codes is not None and (f.codes.yes, f.codes.no) == (1, 2)


def test_rows_outside_the_population_are_refused_with_a_code():
    vt = validate_records(_frame(), SCHEMA)
    assert vt.codes == {
        2: OUTSIDE_POPULATION,  # Age 16
        3: OUTSIDE_POPULATION,  # day 5 of illness
        4: OUTSIDE_POPULATION,  # Age 0.5
        5: POPULATION_UNKNOWN,  # Age missing
        6: POPULATION_UNKNOWN,  # day of illness missing
    }
    assert vt.rejected[2] == ["Age: outside the intended population 1..15"]
    assert vt.rejected[3] == ["DayDisease: outside the intended population 1..3"]
    assert list(vt.rows) == [0, 1] and len(vt.X) == 2  # refused rows are not scored
    assert vt.refusals() == {OUTSIDE_POPULATION: 3, POPULATION_UNKNOWN: 2}
    assert "refused outside_intended_population: 3" in vt.summary()
    # scoring: a table without a population column refuses every row, it does not guess
    vt = validate_records(
        _frame().drop(columns=["DayDisease", "Lab_Confirmed_Dengue"]),
        SCHEMA,
        require_outcome=False,
    )
    assert len(vt.X) == 0 and vt.codes[0] == vt.codes[1] == POPULATION_UNKNOWN
    # training: the same is a schema error that names the column
    with pytest.raises(SchemaError, match="DayDisease"):
        validate_records(_frame().drop(columns="DayDisease"), SCHEMA)


def test_reference_standard_columns_can_never_be_features(tmp_path):
    from pydantic import ValidationError

    from diagnostics.configio import ConfigError
    from diagnostics.train.risk_config import load_risk_config

    spec = SPEC | {"features": [*SPEC["features"], {"name": "PCR", "type": "binary"}]}
    with pytest.raises(ValidationError, match="PCR defines the outcome"):
        TableSchema.model_validate(spec)
    # the shipped config with NS1 ELISA added as a feature is refused at load, naming it
    with pytest.raises(ConfigError, match="NS1_ELISA defines the outcome"):
        load_risk_config(
            REPO / "configs/risk/dengue_vn_cbc.yaml",
            ["schema.features=[{name: NS1_ELISA, type: numeric}]"],
        )
    # leave-one-group-out needs a known grouping column
    with pytest.raises(ConfigError, match=r"split\.group"):
        load_risk_config(REPO / "configs/risk/dengue_vn_cbc.yaml", ["split.group=Hospital"])


def test_the_three_configs_load():
    from diagnostics.train.risk_config import load_risk_config

    for name, n, has_ns1 in (("dengue_vn", 25, False), ("dengue_vn_cbc", 4, False),
                             ("dengue_vn_ns1", 26, True)):  # fmt: skip
        cfg = load_risk_config(REPO / f"configs/risk/{name}.yaml")
        names = cfg.table_schema.feature_names
        assert len(names) == n and ("NS1_TRIP" in names) == has_ns1
        assert cfg.split.strategy == "leave_one_group_out" and cfg.split.group == "SiteNo"


def test_leave_one_site_out_on_the_oucru_table(home, tmp_path):
    """train risk (CLI) on dengue_vn_cbc.yaml with four children moved outside the population."""
    from typer.testing import CliRunner

    from diagnostics.cli import app

    df = pd.read_csv(shared("clinical", "dengue_oucru_vn.csv"))
    df.loc[0, "Age"] = 16  # too old
    df.loc[1, "DayDisease"] = 4  # too late in the illness
    df.loc[2, "Age"] = 0  # too young
    df.loc[3, "DayDisease"] = None  # unknown day of illness
    table = tmp_path / "dengue.csv"
    df.to_csv(table, index=False)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "risk",
            "--config",
            str(REPO / "configs/risk/dengue_vn_cbc.yaml"),
            "--set",
            f"table={table}",
            "--set",
            "eval.bootstrap=20",
            "--no-mlflow",
        ],
    )
    assert result.exit_code == 0, result.output
    run = max(home.glob("runs/dengue_vn_cbc-*"))
    doc = json.loads((run / "metrics.json").read_text())
    loso = doc["loso"]
    assert sorted(loso["groups"]) == ["1", "2", "3", "4", "7"]
    for site, r in loso["groups"].items():
        assert r["auroc"] > 0.6, (site, r)
        assert 0 < r["sensitivity"] < 1 and 0 < r["specificity"] < 1
        assert np.isfinite(r["calibration_slope"]) and np.isfinite(r["calibration_intercept"])
    assert sum(r["n"] for r in loso["groups"].values()) == 4866 - 4  # refused rows not scored
    assert loso["pooled_auroc"] > 0.75
    assert doc["refusals"] == {OUTSIDE_POPULATION: 3, POPULATION_UNKNOWN: 1}
    assert doc["rows"] == {"read": 4866, "kept": 4862, "rejected": 4}
    assert doc["onnx_parity_max_abs_diff"] <= 1e-5
    card = (run / "model_card.md").read_text()
    assert "## Performance by SiteNo (leave-one-SiteNo-out)" in card
    assert "out-of-SiteNo AUROC ranged from" in card
    assert "outside_intended_population 3" in card

    # at the clinic: the exported model refuses the same rows with the code, and scores the rest
    from diagnostics.serve.risk import RiskModel

    scored = RiskModel(run / "model.onnx").score(df.head(6).drop(columns="Lab_Confirmed_Dengue"))
    assert list(scored["status"]) == ["rejected"] * 4 + ["scored"] * 2
    assert list(scored["code"][:4]) == [OUTSIDE_POPULATION] * 3 + [POPULATION_UNKNOWN]
    assert scored["risk"][:4].isna().all() and scored["risk"][4:].between(0, 1).all()
