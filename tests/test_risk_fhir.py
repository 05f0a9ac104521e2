"""FHIR R4 in and out for risk scoring: Bundle -> record, record view -> RiskAssessment,
OperationOutcome and a collection Bundle (validated with fhir.resources R4B). Fast, synthetic."""

from __future__ import annotations

import copy
import re
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from diagnostics.serve.risk_fhir import (
    FhirInputError,
    FhirRecord,
    age_in_years,
    operation_outcome,
    records_from_bundle,
    response_bundle,
    risk_assessment,
    same_unit,
    unit_kind,
)
from diagnostics.tables import FHIR_FEATURE_SYSTEM, FhirMapping, TableSchema, validate_records
from diagnostics.train.risk_config import load_risk_config

REPO = Path(__file__).resolve().parents[1]
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
# what must never appear in an error message
NAME, IDENT, BIRTH = "Nguyễn Văn An", "VN-079-2015-123456", "2015-06-15"


@pytest.fixture(scope="module")
def schemas() -> dict[str, TableSchema]:
    return {
        n: load_risk_config(REPO / f"configs/risk/{n}.yaml").table_schema
        for n in ("dengue_vn", "dengue_vn_cbc", "dengue_vn_ns1")
    }


def patient(**kw: Any) -> dict[str, Any]:
    p = {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": "https://his.example.vn/patient", "value": IDENT}],
        "name": [{"text": NAME}],
        "gender": "female",
        "birthDate": BIRTH,
    }
    p.update(kw)
    return {k: v for k, v in p.items() if v is not None}


def obs(
    code: str,
    *,
    system: str = LOINC,
    id: str | None = None,
    status: str = "final",
    when: str | None = "2024-06-14T09:30:00+07:00",
    subject: str | None = "Patient/p1",
    **value: Any,
) -> dict[str, Any]:
    o: dict[str, Any] = {
        "resourceType": "Observation",
        "status": status,
        "code": {"coding": [{"system": system, "code": code}]},
    }
    if id:
        o["id"] = id
    if subject:
        o["subject"] = {"reference": subject}
    if when:
        o["effectiveDateTime"] = when
    return o | value


def qty(value: float, code: str | None = None) -> dict[str, Any]:
    q: dict[str, Any] = {"value": value}
    if code:
        q |= {"unit": code, "system": UCUM, "code": code}
    return {"valueQuantity": q}


def feature_obs(name: str, **kw: Any) -> dict[str, Any]:
    return obs(name, system=FHIR_FEATURE_SYSTEM, **kw)


def bundle(*resources: dict[str, Any], type: str = "collection") -> dict[str, Any]:
    entries = [
        {"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}", "resource": r}
        for i, r in enumerate(resources)
    ]
    return {"resourceType": "Bundle", "type": type, "entry": entries}


def cbc_bundle(when: str = "2024-06-14T09:30:00+07:00", **patient_kw: Any) -> dict[str, Any]:
    return bundle(
        patient(**patient_kw),
        obs("6690-2", id="wbc1", when=when, **qty(3.2, "10*3/uL")),
        obs("777-3", id="plt1", when=when, **qty(95, "10*9/L")),
        feature_obs("DayDisease", id="day1", when=when, valueInteger=2),
        feature_obs("Vomiting", id="vom1", when=when, valueBoolean=True),
    )


def test_cbc_bundle_gives_a_record_validate_records_accepts(schemas):
    schema = schemas["dengue_vn_cbc"]
    rec = records_from_bundle(cbc_bundle(), schema)
    assert isinstance(rec, FhirRecord)
    assert rec.record == {"Age": 8.0, "WBC": 3.2, "PLT": 95.0, "DayDisease": 2.0}
    vt = validate_records(pd.DataFrame([rec.record]), schema, require_outcome=False)
    assert not vt.rejected and vt.X.iloc[0].to_dict() == rec.record
    assert rec.subject == {
        "reference": "Patient/p1",
        "identifier": {"system": "https://his.example.vn/patient", "value": IDENT},
    }
    refs = [b["reference"] for b in rec.basis]
    assert refs == ["Observation/wbc1", "Observation/plt1", "Observation/day1"]
    # Vomiting is not in this model: said, not used
    assert any("Vomiting" in n and "not used" in n for n in rec.notes)
    assert any("Age: from Patient.birthDate" in n for n in rec.notes)


def test_full_bundle_maps_sex_symptoms_and_ns1(schemas):
    b = cbc_bundle(type="transaction")
    b["entry"] += [
        {
            "resource": feature_obs(
                "Abdo",
                valueCodeableConcept={
                    "coding": [{"system": SNOMED, "code": "373067005", "display": "No"}]
                },
            )
        },
        {
            "resource": feature_obs(
                "NS1_TRIP",
                valueCodeableConcept={"coding": [{"system": SNOMED, "code": "10828004"}]},
            )
        },
        {"resource": obs("4544-3", **qty(41.5, "%"))},
        {"resource": obs("8310-5", **qty(38.9, "Cel"))},
        {"resource": obs("1751-7", **qty(38, "g/L"))},
        {"resource": {"resourceType": "Encounter", "status": "finished"}},
    ]
    for name in ("dengue_vn", "dengue_vn_ns1"):
        schema = schemas[name]
        rec = records_from_bundle(b, schema)
        assert rec.record["Sex"] == 2.0  # table code 2 = female
        assert rec.record["Vomiting"] == 1.0 and rec.record["Abdo"] == 2.0
        assert rec.record["HCT"] == 41.5 and rec.record["Temp"] == 38.9
        assert ("NS1_TRIP" in rec.record) == (name == "dengue_vn_ns1")
        assert "ALT" not in rec.record  # no Observation: absent, the model imputes
        vt = validate_records(rec.frame(schema), schema, require_outcome=False)
        assert not vt.rejected
        row = vt.X.iloc[0]
        assert row["Sex"] == 1.0 and row["Vomiting"] == 1.0 and row["Abdo"] == 0.0
        assert pd.isna(row["ALT"])
        if name == "dengue_vn_ns1":
            assert row["NS1_TRIP"] == 1.0
        assert any("Encounter" in n for n in rec.notes)
    male = copy.deepcopy(b)
    male["entry"][0]["resource"]["gender"] = "male"
    assert records_from_bundle(male, schemas["dengue_vn"]).record["Sex"] == 1.0
    unknown = copy.deepcopy(b)
    unknown["entry"][0]["resource"]["gender"] = "unknown"
    rec = records_from_bundle(unknown, schemas["dengue_vn"])
    assert "Sex" not in rec.record and any(n.startswith("Sex:") for n in rec.notes)


@pytest.mark.parametrize(
    ("birth", "when", "now", "age"),
    [
        (BIRTH, "2024-06-14T23:59:00+07:00", None, 8),  # the day before the 9th birthday
        (BIRTH, "2024-06-15T00:10:00+07:00", None, 9),  # the birthday itself
        (BIRTH, "2024-06-15", None, 9),
        (BIRTH, None, datetime(2024, 6, 14, 12), 8),  # no effective date: the time of scoring
        (BIRTH, None, datetime(2024, 6, 15, 12), 9),
        ("2016-02-29", "2024-02-28", None, 7),  # leap-day birthday
        ("2016-02-29", "2024-03-01", None, 8),
        ("2015-06", "2024-07-01", None, 9),  # partial birth date, still decided
        ("2015", "2024-12-31", None, 9),
    ],
)
def test_age_from_birth_date_across_a_birthday(schemas, birth, when, now, age):
    b = cbc_bundle(when=when, birthDate=birth) if when else cbc_bundle(birthDate=birth)
    if when is None:
        for e in b["entry"][1:]:
            e["resource"].pop("effectiveDateTime")
    rec = records_from_bundle(b, schemas["dengue_vn_cbc"], now=now)
    assert rec.record["Age"] == float(age)


def test_age_undecided_by_a_partial_birth_date_is_missing(schemas):
    rec = records_from_bundle(
        cbc_bundle(when="2024-06-14", birthDate="2015-06"), schemas["dengue_vn_cbc"]
    )
    assert "Age" not in rec.record
    assert any("Age" in n and "imprecise" in n for n in rec.notes)
    # without the population value, the schema refuses the record (population_unknown)
    vt = validate_records(
        rec.frame(schemas["dengue_vn_cbc"]), schemas["dengue_vn_cbc"], require_outcome=False
    )
    assert vt.codes == {0: "population_unknown"}
    assert age_in_years("2015-06-15", date(2024, 6, 15)) == 9


def test_age_observation(schemas):
    b = cbc_bundle(birthDate=None)
    b["entry"].append({"resource": obs("30525-0", **qty(9, "a"))})
    assert records_from_bundle(b, schemas["dengue_vn_cbc"]).record["Age"] == 9.0
    # with a birth date too: they agree (8 on 2024-06-14)
    b = cbc_bundle()
    b["entry"].append({"resource": obs("30525-0", **qty(8, "a"))})
    assert records_from_bundle(b, schemas["dengue_vn_cbc"]).record["Age"] == 8.0


def test_ignored_observations_are_noted(schemas):
    b = cbc_bundle()
    b["entry"] += [
        {"resource": obs("6690-2", status="entered-in-error", **qty(99, "10*9/L"))},
        {"resource": obs("777-3", status="cancelled", **qty(12, "10*9/L"))},
        {"resource": obs("6690-2", id="wbc2", status="amended", **qty(3.2, "10*9/L"))},
        {"resource": obs("2345-7", **qty(5.1, "mmol/L"))},  # glucose: not in the model
        {"resource": obs("777-3", status="final", dataAbsentReason={"text": "clotted"})},
    ]
    rec = records_from_bundle(b, schemas["dengue_vn_cbc"])
    assert rec.record["WBC"] == 3.2 and rec.record["PLT"] == 95.0
    notes = " | ".join(rec.notes)
    assert "'entered-in-error': ignored" in notes and "'cancelled': ignored" in notes
    assert f"{LOINC}|2345-7: not used by this model" in notes
    assert "WBC: 2 Observations with the same value" in notes
    assert "PLT: Observation without a value (dataAbsentReason given)" in notes
    # a cancelled Observation alone: the feature is absent
    only = bundle(patient(), obs("6690-2", status="cancelled", **qty(3.2, "10*9/L")))
    rec = records_from_bundle(only, schemas["dengue_vn_cbc"])
    assert "WBC" not in rec.record and any("WBC" in n and "cancelled" in n for n in rec.notes)


def _with(*extra: dict[str, Any], **patient_kw: Any) -> dict[str, Any]:
    b = cbc_bundle(**patient_kw)
    b["entry"] += [{"resource": r} for r in extra]
    return b


ERRORS = {
    "not a bundle": (patient(), "expected a FHIR Bundle"),
    "not a dict": ([patient()], "expected a FHIR Bundle"),
    "two patients": (_with(patient(id="p2")), "more than one Patient"),
    "different subjects": (
        _with(obs("731-0", subject="Patient/p2", **qty(1.0, "10*9/L"))),
        "different subjects",
    ),
    "subject not the patient": (
        bundle(patient(), obs("6690-2", subject="Patient/other", **qty(3.2, "10*9/L"))),
        "not the Bundle's Patient",
    ),
    "conflicting values": (_with(obs("26464-8", **qty(7.5, "10*9/L"))), "WBC: two Observations"),
    "unit mismatch": (_with(obs("751-8", **qty(1.1, "/uL"))), "unit '/uL'"),
    "unit mismatch albumin": (_with(obs("1751-7", **qty(3.8, "g/dL"))), "ALB: unit 'g/dL'"),
    "age in months": (_with(obs("30525-0", **qty(100, "mo"))), "Age: unit 'mo'"),
    "age disagrees with birth date": (
        _with(obs("30525-0", **qty(12, "a"))),
        "Age: the Observation and Patient.birthDate disagree",
    ),
    "number as text": (_with(obs("731-0", valueString="1.2")), "LYMCount: expected a number"),
    "boolean for a number": (_with(obs("742-7", valueBoolean=True)), "MONOCount: expected"),
    "comparator": (
        _with(obs("1920-8", valueQuantity={"value": 5, "comparator": "<", "code": "U/L"})),
        "AST: a value with a comparator",
    ),
    "quantity for a symptom": (_with(feature_obs("Rash", **qty(7))), "Rash: the value is not"),
    "unknown coded answer": (
        _with(
            feature_obs(
                "Rash", valueCodeableConcept={"coding": [{"system": SNOMED, "code": "260413007"}]}
            )
        ),
        "Rash: the coded answer",
    ),
    "sex observation disagrees": (
        _with(feature_obs("Sex", valueCodeableConcept={"coding": [{"code": "male"}]})),
        "Sex: the Observation and the Patient disagree",
    ),
    "bad birth date": (_with(birthDate="2015-13-45"), "Patient.birthDate: not a valid date"),
    "birth date not a date": (_with(birthDate="15/06/2015"), "Patient.birthDate: not a FHIR date"),
    "born after": (_with(birthDate="2030-01-02"), "Patient.birthDate is after"),
    "bad effective date": (
        _with(feature_obs("Rash", when="2024-99-01", valueBoolean=True)),
        "Rash: the Observation's effective time: not a FHIR date",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_what_cannot_be_read_raises_without_identifying_the_patient(schemas, case):
    doc, message = ERRORS[case]
    with pytest.raises(FhirInputError, match=None) as exc:
        records_from_bundle(copy.deepcopy(doc), schemas["dengue_vn_ns1"])
    text = str(exc.value)
    assert message in text, text
    for secret in (NAME, IDENT, BIRTH, "2015-13-45", "15/06/2015", "2030-01-02", "p1", "p2"):
        assert secret not in text, (case, text)
    assert isinstance(exc.value, ValueError)


def test_units_and_bundle_types(schemas):
    assert same_unit("10^9/L", "10*9/L") and same_unit("10^9/L", "10*3/uL")
    assert same_unit("%", "%") and same_unit("degC", "Cel") and same_unit("years", "a")
    assert not same_unit("g/L", "g/dL") and not same_unit("10^9/L", "10*6/uL")
    for kind in ("collection", "batch", "transaction", "searchset"):
        rec = records_from_bundle(cbc_bundle() | {"type": kind}, schemas["dengue_vn_cbc"])
        assert rec.record["WBC"] == 3.2
    # no UCUM code: the unit text is checked (G/L: giga per litre)
    b = bundle(obs("6690-2", subject=None, **{"valueQuantity": {"value": 4.0, "unit": "G/L"}}))
    rec = records_from_bundle(b, schemas["dengue_vn_cbc"])
    assert rec.record == {"WBC": 4.0} and rec.subject is None
    assert rec.basis == [{"reference": b["entry"][0]["fullUrl"]}]


def test_subject_by_identifier_and_urn(schemas):
    p = patient(id=None)
    urn = "urn:uuid:00000000-0000-4000-8000-000000000000"
    b = bundle(p, obs("6690-2", subject=urn, **qty(3.2, "10*9/L")))
    rec = records_from_bundle(b, schemas["dengue_vn_cbc"])
    # a urn: reference means nothing outside the request: the identifier stands in
    assert rec.subject == {
        "identifier": {"system": "https://his.example.vn/patient", "value": IDENT}
    }
    o = obs("6690-2", subject=None, **qty(3.2, "10*9/L"))
    o["subject"] = {"identifier": {"system": "https://his.example.vn/patient", "value": IDENT}}
    rec = records_from_bundle(bundle(patient(), o), schemas["dengue_vn_cbc"])
    assert rec.subject["reference"] == "Patient/p1"


def test_mapping_is_optional_and_the_project_system_always_works():
    schema = TableSchema.model_validate(
        {
            "name": "t",
            "features": [
                {"name": "Cough", "type": "binary", "codes": {"yes": 1, "no": 2}},
                {"name": "cp", "type": "categorical", "categories": [1, 2, 3, 4]},
                {
                    "name": "Hb",
                    "type": "numeric",
                    "unit": "g/L",
                    "fhir": {"codes": ["http://loinc.org|718-7"]},
                },
            ],
            "outcome": {"column": "y"},
            "population": {"Age": [1, 15], "DayDisease": [1, 3]},
        }
    )
    assert schema.features[0].fhir is None
    b = bundle(
        feature_obs("Cough", valueBoolean=False),
        feature_obs(
            "cp", valueCodeableConcept={"coding": [{"system": FHIR_FEATURE_SYSTEM, "code": "3"}]}
        ),
        obs("718-7", **qty(121, "g/L")),
        feature_obs("Age", **qty(7, "a")),
        feature_obs("DayDisease", valueInteger=2),
    )
    rec = records_from_bundle(b, schema)
    # population columns that are not features come through too
    assert rec.record == {"Cough": 2.0, "cp": 3.0, "Hb": 121.0, "Age": 7.0, "DayDisease": 2.0}
    vt = validate_records(rec.frame(schema), schema, require_outcome=False)
    assert not vt.rejected and vt.X.iloc[0]["Cough"] == 0.0
    with pytest.raises(ValueError, match="system"):
        FhirMapping(codes=["6690-2"])
    assert FhirMapping.model_validate({"values": {True: 1, False: 2}}).values == {
        "true": 1.0,
        "false": 2.0,
    }


def unit_only(value: float, unit: str) -> dict[str, Any]:
    """A Quantity as many HIS send it: a human unit text, no UCUM code."""
    return {"valueQuantity": {"value": value, "unit": unit}}


# (LOINC code, column, value, unit text as sent): the schema's unit, spelled another way
UNIT_TEXT_ACCEPTED = [
    ("30525-0", "Age", 8, "years"),
    ("30525-0", "Age", 8, " Year "),
    ("30525-0", "Age", 8, "yr"),
    ("30525-0", "Age", 8, "a"),
    ("30525-0", "Age", 8, "năm"),
    ("777-3", "PLT", 95, "10^9/L"),
    ("777-3", "PLT", 95, "10*9/L"),
    ("777-3", "PLT", 95, "x10^9/L"),
    ("777-3", "PLT", 95, "× 10⁹/L"),
    ("777-3", "PLT", 95, "10E9/L"),
    ("777-3", "PLT", 95, "10^3/uL"),
    ("777-3", "PLT", 95, "10³/µL"),
    ("777-3", "PLT", 95, "10^3/mm3"),
    ("777-3", "PLT", 95, "K/uL"),
    ("777-3", "PLT", 95, "G/L"),
    ("777-3", "PLT", 95, "10^9 cells/L"),
    ("4544-3", "HCT", 41.5, "%"),
    ("8310-5", "Temp", 38.9, "°C"),
    ("8310-5", "Temp", 38.9, "℃"),
    ("8310-5", "Temp", 38.9, "C"),
    ("8310-5", "Temp", 38.9, "cel"),
    ("8310-5", "Temp", 38.9, "deg C"),
    ("1751-7", "ALB", 38, "g/L"),
    ("1751-7", "ALB", 38, "g/l"),
    ("1920-8", "AST", 40, "IU/L"),
    ("1920-8", "AST", 40, "U/L"),
    ("39156-5", "BMI", 15.2, "kg/m²"),
]


@pytest.mark.parametrize(("code", "column", "value", "unit"), UNIT_TEXT_ACCEPTED)
def test_a_unit_text_without_a_code_is_checked_and_accepted(schemas, code, column, value, unit):
    # the CBC Bundle's own PLT is 95 (as the cases' PLT); no birth date: Age from the Observation
    b = _with(obs(code, **unit_only(value, unit)), birthDate=None)
    rec = records_from_bundle(b, schemas["dengue_vn_ns1"])
    assert rec.record[column] == float(value)


# (LOINC code, column, unit text as sent, what the message says after the column)
UNIT_TEXT_REFUSED = [
    ("30525-0", "Age", "months", "unit 'months' is not the schema's unit 'years'"),
    ("30525-0", "Age", "tháng", "unit 'tháng' is not the schema's unit 'years'"),
    ("30525-0", "Age", "wk", "unit 'wk' is not the schema's unit 'years'"),
    ("1751-7", "ALB", "mg/dL", "unit 'mg/dL' is not the schema's unit 'g/L'"),
    ("1751-7", "ALB", "g/dL", "unit 'g/dL' is not the schema's unit 'g/L'"),
    ("1751-7", "ALB", "G/L", "unit 'G/L' is not the schema's unit 'g/L'"),  # giga per litre
    ("777-3", "PLT", "/mm3", "unit '/mm3' is not the schema's unit '10^9/L'"),
    ("777-3", "PLT", "cells/µL", "unit 'cells/µL' is not the schema's unit '10^9/L'"),
    ("777-3", "PLT", "g/L", "unit 'g/L' is not the schema's unit '10^9/L'"),  # grams
    ("777-3", "PLT", "10^6/uL", "unit '10^6/uL' is not the schema's unit '10^9/L'"),
    ("8310-5", "Temp", "°F", "unit '°F' is not the schema's unit 'degC'"),
    ("4544-3", "HCT", "L/L", "unit 'L/L' is not the schema's unit '%'"),
    ("1920-8", "AST", "ukat/L", "unit 'ukat/L' is not the schema's unit 'U/L'"),
]


@pytest.mark.parametrize(("code", "column", "unit", "said"), UNIT_TEXT_REFUSED)
def test_a_unit_text_naming_another_unit_is_refused(schemas, code, column, unit, said):
    b = bundle(patient(), obs(code, **unit_only(10, unit)))
    with pytest.raises(FhirInputError) as exc:
        records_from_bundle(b, schemas["dengue_vn_ns1"])
    assert str(exc.value).startswith(f"{column}: {said} (nothing is converted)"), str(exc.value)
    assert "send the value in" in str(exc.value)


def test_the_review_case_age_in_months_is_refused_not_scored_as_years(schemas):
    b = bundle(obs("30525-0", subject=None, valueQuantity={"value": 10, "unit": "months"}))
    with pytest.raises(FhirInputError, match="Age: unit 'months' is not the schema's unit 'years'"):
        records_from_bundle(b, schemas["dengue_vn_cbc"])


def test_an_unknown_unit_text_is_refused_with_what_to_send(schemas):
    b = bundle(patient(), obs("777-3", **unit_only(95, "lakh/cumm")))
    with pytest.raises(FhirInputError) as exc:
        records_from_bundle(b, schemas["dengue_vn_cbc"])
    assert str(exc.value) == (
        "PLT: unit 'lakh/cumm' is not a unit this service knows: send the value in '10^9/L' "
        "(UCUM code '10*9/L')"
    )
    long = bundle(patient(), obs("777-3", **unit_only(95, "z" * 500)))
    with pytest.raises(FhirInputError) as exc:
        records_from_bundle(long, schemas["dengue_vn_cbc"])
    assert len(str(exc.value)) < 200  # the sender's text is cut short
    for bad in (5, ["G/L"], {"text": "G/L"}):
        b = bundle(patient(), obs("777-3", valueQuantity={"value": 95, "unit": bad}))
        with pytest.raises(FhirInputError, match=r"PLT: valueQuantity\.unit is not text"):
            records_from_bundle(b, schemas["dengue_vn_cbc"])


def test_a_ucum_code_decides_and_another_systems_code_defers_to_the_text(schemas):
    schema = schemas["dengue_vn_cbc"]

    def plt(**q: Any) -> dict[str, Any]:
        return bundle(patient(), obs("777-3", valueQuantity={"value": 95, **q}))

    # a UCUM code is what counts: the text is a label
    assert records_from_bundle(plt(code="10*9/L", unit="thousands", system=UCUM), schema)
    with pytest.raises(FhirInputError, match="PLT: unit '/uL'"):
        records_from_bundle(plt(code="/uL", unit="10^9/L", system=UCUM), schema)
    with pytest.raises(FhirInputError, match="PLT: unit '/uL'"):
        records_from_bundle(plt(code="/uL", unit="10^9/L"), schema)  # no system: UCUM
    # a local unit code: the text says what it is
    local = "https://his.example.vn/units"
    assert records_from_bundle(plt(code="TBL09", unit="G/L", system=local), schema)
    with pytest.raises(FhirInputError, match="PLT: unit '/mm3'"):
        records_from_bundle(plt(code="TBL06", unit="/mm3", system=local), schema)
    with pytest.raises(FhirInputError, match="PLT: unit 'TBL09'"):
        records_from_bundle(plt(code="TBL09", system=local), schema)
    # no unit at all: a plain number, as a valueInteger is
    assert records_from_bundle(plt(), schema).record["PLT"] == 95.0
    assert unit_kind("10^3/µL") == "10*9/L" and unit_kind("months") == "mo"
    assert unit_kind("G/L") == "10*9/L" and unit_kind("g/L") == "g/L"
    assert unit_kind("furlongs") is None


def _serial(*readings: tuple[float, dict[str, Any]]) -> dict[str, Any]:
    """A bundle with one PLT Observation per (value, timing elements)."""
    return bundle(
        patient(),
        *(
            obs("777-3", id=f"plt{i}", when=None, **qty(v, "10*9/L"), **timing)
            for i, (v, timing) in enumerate(readings)
        ),
    )


DAY1, DAY2 = "2024-06-13T08:00:00+07:00", "2024-06-14T09:30:00+07:00"


@pytest.mark.parametrize(
    ("readings", "used"),
    [
        ([(120, {"effectiveDateTime": DAY1}), (95, {"effectiveDateTime": DAY2})], 1),
        ([(95, {"effectiveDateTime": DAY2}), (120, {"effectiveDateTime": DAY1})], 0),
        # effectivePeriod.end, and issued when there is no effective time
        ([(120, {"effectivePeriod": {"start": DAY1, "end": DAY2}}), (95, {"issued": DAY1})], 0),
        ([(120, {"issued": DAY1}), (95, {"issued": "2024-06-14T02:00:00Z"})], 1),
        # another time zone: 03:00Z is after 09:30+07:00 (02:30Z)
        (
            [
                (120, {"effectiveDateTime": "2024-06-14T03:00:00Z"}),
                (95, {"effectiveDateTime": DAY2}),
            ],
            0,
        ),
        # dates without a time, days apart: still ordered
        (
            [(120, {"effectiveDateTime": "2024-06-11"}), (95, {"effectiveDateTime": "2024-06-14"})],
            1,
        ),
        # three results, the latest repeated
        (
            [
                (150, {"effectiveDateTime": "2024-06-12T08:00:00+07:00"}),
                (120, {"effectiveDateTime": DAY1}),
                (95, {"effectiveDateTime": DAY2}),
            ],
            2,
        ),
    ],
)
def test_serial_observations_use_the_latest(schemas, readings, used):
    rec = records_from_bundle(_serial(*readings), schemas["dengue_vn_cbc"])
    assert rec.record["PLT"] == float(readings[used][0])
    assert rec.basis == [{"reference": f"Observation/plt{used}"}]
    n = len(readings)
    earlier = "1 earlier value" if n == 2 else f"{n - 1} earlier values"
    assert f"PLT: {n} Observations at different times: the latest used, {earlier} left out" in (
        rec.notes
    )
    # the age is taken on the latest Observation's date
    assert rec.record["Age"] == 8.0


def test_serial_observations_that_cannot_be_ordered_are_refused(schemas):
    schema = schemas["dengue_vn_cbc"]
    cases = {
        "same time": [(120, {"effectiveDateTime": DAY2}), (95, {"effectiveDateTime": DAY2})],
        "no time": [(120, {}), (95, {})],
        "one without a time": [(120, {}), (95, {"effectiveDateTime": DAY2})],
        # a date alone may be any time that day, in any zone: it overlaps 09:30 that day
        "date and time": [(120, {"effectiveDateTime": "2024-06-14"}), (95, {"issued": DAY2})],
    }
    for case, readings in cases.items():
        with pytest.raises(FhirInputError, match="PLT: two Observations give different") as exc:
            records_from_bundle(_serial(*readings), schema)
        assert "2024" not in str(exc.value), case
    # the same value twice, with or without a time: one value
    rec = records_from_bundle(_serial((95, {}), (95, {"effectiveDateTime": DAY2})), schema)
    assert rec.record["PLT"] == 95.0 and rec.basis == [{"reference": "Observation/plt1"}]
    assert "PLT: 2 Observations with the same value: one used" in rec.notes
    with pytest.raises(FhirInputError, match="PLT: the Observation's issued time: not a FHIR"):
        records_from_bundle(_serial((95, {"issued": "yesterday"})), schema)


# ---------------------------------------------------------------- odd shapes

WRONG = [5, -1.5, 10**400, float("nan"), True, "x", "", [], [5], {}, {"x": 1}, None]
DELETE = object()


def _paths(doc: Any, path: tuple = ()) -> list[tuple]:
    out = [path] if path else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*path, i))
    return out


def _mutated(doc: Any, path: tuple, value: Any) -> Any:
    doc = copy.deepcopy(doc)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return doc


def _rich_bundle() -> dict[str, Any]:
    b = cbc_bundle()
    b["entry"][0]["resource"]["identifier"].append({"value": "second"})
    b["entry"] += [
        {
            "resource": feature_obs(
                "Abdo",
                when=None,
                effectivePeriod={"start": "2024-06-13", "end": "2024-06-14T08:00:00+07:00"},
                valueCodeableConcept={"coding": [{"system": SNOMED, "code": "373067005"}]},
            )
        },
        {"resource": obs("8310-5", when=None, issued=DAY2, **qty(38.9, "Cel"))},
        {"resource": obs("4544-3", valueQuantity={"value": 41.5, "unit": "%"})},
        {"resource": obs("777-3", id="plt0", when=DAY1, **qty(120, "10*9/L"))},
        {"resource": obs("2345-7", status="cancelled", **qty(5.1, "mmol/L"))},
    ]
    o = b["entry"][-1]["resource"]
    o["subject"] = {"identifier": {"system": "https://his.example.vn/patient", "value": IDENT}}
    return b


def test_the_rich_bundle_reads(schemas):
    rec = records_from_bundle(_rich_bundle(), schemas["dengue_vn"])
    assert rec.record["PLT"] == 95.0 and rec.record["Abdo"] == 2.0 and rec.record["HCT"] == 41.5


def test_wrong_json_types_anywhere_give_fhir_input_errors_never_type_errors(schemas):
    """Every element of a valid Bundle, in turn, replaced by an int, a float, a boolean, text,
    a list, an object or null, or deleted: either the Bundle still reads (to a record that
    serialises as JSON) or it is a FhirInputError (a 422), never a TypeError (a 500)."""
    import json

    base = _rich_bundle()
    paths = _paths(base)
    assert len(paths) > 80
    outcomes = {"read": 0, "refused": 0}
    schema = schemas["dengue_vn"]
    records: set[str] = set()
    for path in paths:
        for value in [*WRONG, DELETE]:
            doc = _mutated(base, path, value)
            try:
                rec = records_from_bundle(doc, schema, now=datetime(2024, 6, 14))
            except FhirInputError as exc:
                outcomes["refused"] += 1
                text = str(exc)
                assert NAME not in text and IDENT not in text and BIRTH not in text, path
                continue
            except Exception as exc:  # pragma: no cover - what the test is for
                pytest.fail(f"{path} = {value!r}: {type(exc).__name__}: {exc}")
            outcomes["read"] += 1
            json.dumps([rec.subject, rec.basis, rec.notes], allow_nan=False)
            records.add(json.dumps(rec.record, allow_nan=False))
            assert all(isinstance(v, float | str) for v in rec.record.values())
            assert all(isinstance(n, str) for n in rec.notes)
    for text in records:  # each record read, once: the schema takes it (or refuses a row)
        frame = FhirRecord(record=json.loads(text)).frame(schema)
        validate_records(frame, schema, require_outcome=False)
    assert outcomes["read"] and outcomes["refused"]
    # the shapes the review named
    dengue = schemas["dengue_vn"]
    empty = records_from_bundle(_mutated(base, ("entry",), {}), dengue)
    assert empty.record == {} and empty.subject is None
    no_resource = records_from_bundle(_mutated(base, ("entry", 1, "resource"), 3), dengue)
    assert "1 entries without a resource: not used, ignored" in no_resource.notes
    for path, value, said in [
        (
            ("entry", 1, "resource", "code", "coding"),
            5,
            "Observation.code is not a CodeableConcept",
        ),
        (("entry", 0, "resource", "identifier"), 5, "Patient.identifier is not a list"),
        (("entry", 1, "resource", "valueQuantity"), "x", "WBC: valueQuantity is not a Quantity"),
        (("entry", 1, "resource", "subject"), 5, "Observation.subject is not a Reference"),
        (("entry", 0, "resource", "gender"), ["female"], "Sex: Patient.gender is not a code"),
    ]:
        with pytest.raises(FhirInputError, match=re.escape(said)):
            records_from_bundle(_mutated(base, path, value), dengue)


# ---------------------------------------------------------------- out


def view(**kw: Any) -> dict[str, Any]:
    v = {
        "id": "rr-0001",
        "clinic": "clinic-hcm-01",
        "model": "dengue_vn",
        "model_name": "dengue_vn.onnx",
        "model_version": "3",
        "model_sha256": "ab" * 32,
        "label": "dengue",
        "status": "scored",
        "probability": 0.6234,
        "raw_probability": 0.5811,
        "category": "high",
        "threshold": 0.41,
        "imputed": ["ALB", "AST"],
        "code": None,
        "reasons": [],
        "created_at": "2024-06-14T09:45:12+07:00",
        "profile_id": 4,
        "outcome": None,
        "subject": {"reference": "Patient/p1"},
        "basis": [{"reference": "Observation/wbc1"}],
    }
    v.update(kw)
    return v


def test_risk_assessment_validates_and_carries_the_result():
    from fhir.resources.R4B.riskassessment import RiskAssessment

    ra = risk_assessment(view())
    RiskAssessment.model_validate(ra)
    assert ra["status"] == "final"
    assert ra["identifier"] == [
        {"system": "https://diagnostics.example/fhir/sid/risk-record", "value": "rr-0001"}
    ]
    pred = ra["prediction"][0]
    assert pred["probabilityDecimal"] == pytest.approx(0.6234)
    assert pred["qualitativeRisk"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/risk-probability",
        "code": "high",
        "display": "High likelihood",
    }
    assert {"system": SNOMED, "code": "38362002", "display": "Dengue (disorder)"} in pred[
        "outcome"
    ]["coding"]
    assert "0.410" in pred["rationale"]
    assert "Probability recalibrated for the site (the model's own was 0.581)" in pred["rationale"]
    assert "threshold: the site's own (site profile 4)" in pred["rationale"]
    assert "abababababab" in ra["method"]["text"] and "version 3" in ra["method"]["text"]
    notes = " ".join(n["text"] for n in ra["note"])
    assert "ALB, AST" in notes and "not a diagnosis" in notes
    assert ra["occurrenceDateTime"] == "2024-06-14T09:45:12+07:00"
    assert ra["basis"] == [{"reference": "Observation/wbc1"}]

    plain = risk_assessment(
        view(
            subject=None,
            basis=[],
            profile_id=None,
            raw_probability=0.2,
            probability=0.2,
            category="low",
            imputed=[],
            model_version=None,
            label="risk",
            outcome={"value": True, "recorded_at": "2024-06-20T10:00:00+07:00", "by": "dr.lan"},
        )
    )
    RiskAssessment.model_validate(plain)
    assert plain["subject"] == {"display": "not identified"} and "basis" not in plain
    assert "No site recalibration" in plain["prediction"][0]["rationale"]
    assert plain["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "low"
    assert "coding" not in plain["prediction"][0]["outcome"]
    assert "unregistered" in plain["method"]["text"]
    assert plain["note"][-1]["authorString"] == "dr.lan"
    with pytest.raises(ValueError):
        risk_assessment(view(status="refused"))


@pytest.mark.parametrize(
    ("code", "issue"),
    [
        ("outside_intended_population", "business-rule"),
        ("population_unknown", "business-rule"),
        ("invalid_value", "invalid"),
    ],
)
def test_operation_outcome_for_a_refused_record(code, issue):
    from fhir.resources.R4B.operationoutcome import OperationOutcome

    reasons = ["Age: outside the intended population 1..15", "WBC: outside 0.3..100"]
    oo = operation_outcome(
        view(
            status="refused",
            code=code,
            reasons=reasons,
            probability=None,
            raw_probability=None,
            category=None,
        )
    )
    OperationOutcome.model_validate(oo)
    (i,) = oo["issue"]
    assert i["severity"] == "error" and i["code"] == issue
    assert i["details"]["coding"] == [
        {"system": "https://diagnostics.example/fhir/CodeSystem/refusal", "code": code}
    ]
    assert i["diagnostics"] == "; ".join(reasons)
    with pytest.raises(ValueError):
        operation_outcome(view())


def test_response_bundle_validates():
    from fhir.resources.R4B.bundle import Bundle

    views = [
        view(),
        view(
            id="rr-0002",
            status="refused",
            code="population_unknown",
            probability=None,
            raw_probability=None,
            category=None,
            reasons=["DayDisease: missing"],
        ),
    ]
    doc = response_bundle(views)
    parsed = Bundle.model_validate(doc)
    assert doc["type"] == "collection" and len(parsed.entry) == 2
    kinds = [e["resource"]["resourceType"] for e in doc["entry"]]
    assert kinds == ["RiskAssessment", "OperationOutcome"]
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in doc["entry"])
    assert len({e["fullUrl"] for e in doc["entry"]}) == 2
    assert float(parsed.entry[0].resource.prediction[0].probabilityDecimal) == pytest.approx(0.6234)


@pytest.mark.parametrize(
    ("kw", "said", "not_said"),
    [
        (
            {"profile_id": 4, "probability": 0.6234, "raw_probability": 0.5811},
            "Probability recalibrated for the site (the model's own was 0.581); operating "
            "threshold: the site's own (site profile 4).",
            "No site",
        ),
        (  # a threshold-only profile: the probability is the model's own
            {"profile_id": 7, "probability": 0.6234, "raw_probability": 0.6234},
            "Operating threshold: the site's own (site profile 7); the probability is the "
            "model's own, not recalibrated.",
            "recalibrated for the site",
        ),
        (
            {"profile_id": None, "probability": 0.6234, "raw_probability": 0.5811},
            "Probability recalibrated for the site (the model's own was 0.581); operating "
            "threshold: the model's own.",
            "site profile",
        ),
        (
            {"profile_id": None, "probability": 0.6234, "raw_probability": 0.6234},
            "No site recalibration: the model's own probability and threshold.",
            "site's own",
        ),
    ],
)
def test_the_rationale_says_exactly_what_the_site_profile_changed(kw, said, not_said):
    rationale = risk_assessment(view(**kw))["prediction"][0]["rationale"]
    assert rationale.endswith(said), rationale
    assert not_said not in rationale
    assert "Site recalibration applied" not in rationale


NOTES = [
    "Observation (PLT) with status 'cancelled': ignored",
    "PLT: 2 Observations at different times: the latest used, 1 earlier value left out",
]


def test_the_bundles_notes_travel_with_the_risk_assessment():
    from fhir.resources.R4B.riskassessment import RiskAssessment

    ra = risk_assessment(view(notes=NOTES, imputed=["ALB", "PLT"]))
    RiskAssessment.model_validate(ra)
    texts = [n["text"] for n in ra["note"]]
    assert texts[0].startswith(
        "Not provided or not usable (see notes), so filled in by the model's imputation: ALB, PLT."
    )
    assert [t for t in texts if t.startswith("As read from the FHIR Bundle: ")] == [
        f"As read from the FHIR Bundle: {n}" for n in NOTES
    ]
    # no notes (a JSON record, an older view without the key, or odd values): as before
    for kw in ({}, {"notes": []}, {"notes": None}, {"notes": "text"}, {"notes": [3, " "]}):
        plain = risk_assessment(view(**kw))
        texts = [n["text"] for n in plain["note"]]
        assert texts[0].startswith("Not provided, so filled in"), kw
        assert not any("FHIR Bundle" in t for t in texts)
    everything = risk_assessment(view(notes=NOTES, imputed=[]))
    assert everything["note"][0]["text"] == "Every predictor was provided: nothing was imputed."


def test_the_bundles_notes_are_warnings_of_the_operation_outcome():
    from fhir.resources.R4B.operationoutcome import OperationOutcome

    refused = view(
        status="refused",
        code="population_unknown",
        reasons=["Age: missing"],
        probability=None,
        raw_probability=None,
        category=None,
        notes=["Age: Patient.birthDate too imprecise for whole years: missing"],
    )
    oo = operation_outcome(refused)
    OperationOutcome.model_validate(oo)
    error, warning = oo["issue"]
    assert error["severity"] == "error" and error["diagnostics"] == "Age: missing"
    assert warning == {
        "severity": "warning",
        "code": "informational",
        "diagnostics": "As read from the FHIR Bundle: Age: Patient.birthDate too imprecise for "
        "whole years: missing",
    }
    assert len(operation_outcome({**refused, "notes": []})["issue"]) == 1
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(response_bundle([view(notes=NOTES), refused]))


def test_an_ignored_observation_is_never_just_imputed_without_a_reason(schemas):
    """From a Bundle to the RiskAssessment: the PLT Observation was cancelled, so PLT is
    imputed, and the RiskAssessment says why."""
    b = bundle(
        patient(),
        obs("6690-2", **qty(3.2, "10*9/L")),
        obs("777-3", status="cancelled", **qty(95, "10*9/L")),
        feature_obs("DayDisease", valueInteger=2),
    )
    rec = records_from_bundle(b, schemas["dengue_vn_cbc"])
    assert "PLT" not in rec.record
    ra = risk_assessment(view(imputed=["PLT"], notes=rec.notes))
    texts = " | ".join(n["text"] for n in ra["note"])
    assert (
        "Not provided or not usable (see notes), so filled in by the model's imputation: PLT"
        in (texts)
    )
    assert "As read from the FHIR Bundle: Observation (PLT) with status 'cancelled': ignored" in (
        texts
    )
