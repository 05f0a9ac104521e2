"""FHIR R4 in and out for clinic risk scoring (`POST /v1/risk/{model}`). Torch-free, plain dicts:
fhir.resources is not a runtime dependency (the tests validate with it).

In (`records_from_bundle`): a Bundle of any type with at most one Patient and that patient's
Observations -> one record keyed by column name, holding raw values as a CSV row of the model's
table would (numbers as floats, yes/no as the table's raw codes), ready for
`tables.validate_records`. Each feature's `fhir` mapping (`tables.FhirMapping`) names the
Observation codes that carry it, or says it comes from Patient.gender / Patient.birthDate; an
Observation coded `FHIR_FEATURE_SYSTEM|<column name>` is always read as that column (features
and population columns alike). Nothing is converted: a Quantity coded in another UCUM unit than
the schema's is refused. Observations with status entered-in-error, cancelled (or anything but
final / amended / corrected / preliminary) are ignored and the record's `notes` say so, as they
say what else was ignored. What cannot be read raises `FhirInputError`, whose message names the
column and the problem, never the patient (no names, identifiers or dates: it may be logged).

Out: `risk_assessment` (a scored record -> RiskAssessment), `operation_outcome` (a refused
record -> OperationOutcome), `response_bundle` (a collection Bundle of either, one per record).
"""

from __future__ import annotations

import calendar
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import pandas as pd

from diagnostics.tables import FHIR_FEATURE_SYSTEM, Feature, TableSchema, _norm

RECORD_SYSTEM = "https://diagnostics.example/fhir/sid/risk-record"
MODEL_SYSTEM = "https://diagnostics.example/fhir/CodeSystem/risk-model"
REFUSAL_SYSTEM = "https://diagnostics.example/fhir/CodeSystem/refusal"
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
SNOMED = "http://snomed.info/sct"
USABLE_STATUS = ("final", "amended", "corrected", "preliminary")
# A yes/no feature without `fhir.values`: valueBoolean and SNOMED CT yes / no map to its codes.
_YES_NO = {"true": "yes", "false": "no", f"{SNOMED}|373066001": "yes", f"{SNOMED}|373067005": "no"}
# Known outcomes: label -> (system, code, display) for RiskAssessment.prediction.outcome
OUTCOMES = {"dengue": (SNOMED, "38362002", "Dengue (disorder)")}
_RISK_DISPLAY = {"high": "High likelihood", "low": "Low likelihood"}
_REFUSAL_ISSUE = {
    "outside_intended_population": "business-rule",
    "population_unknown": "business-rule",
    "invalid_value": "invalid",
}
# Unit spellings taken as one unit (normalised: lower case, no spaces, ^ -> *, µ -> u)
_UNIT_GROUPS = (
    {"10*9/l", "10*3/ul", "10*3/mm3", "/nl"},
    {"a", "yr", "year", "years"},
    {"cel", "degc", "°c"},
    {"d", "day", "days", "dayofillness"},
    {"u/l", "iu/l", "[iu]/l"},
    {"kg/m2", "kg/m*2"},
)
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_PATIENT_REF = re.compile(r"(?:^|/)(Patient/[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]*)?$")
_FHIR_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")
_VALUE_KEYS = (
    "valueQuantity", "valueCodeableConcept", "valueString", "valueBoolean", "valueInteger",
    "valueRange", "valueRatio", "valueSampledData", "valueTime", "valueDateTime", "valuePeriod",
)  # fmt: skip


class FhirInputError(ValueError):
    """The Bundle cannot be read. The message names a column and the problem, never the patient."""


@dataclass
class FhirRecord:
    """One record read from a Bundle, and how it was read."""

    record: dict[str, Any] = field(default_factory=dict)  # column -> raw value; absent = missing
    subject: dict[str, Any] | None = None  # FHIR Reference to the patient
    basis: list[dict[str, Any]] = field(default_factory=list)  # References to Observations used
    notes: list[str] = field(default_factory=list)  # what was ignored, and why

    def frame(self, schema: TableSchema) -> pd.DataFrame:
        """A one-row table with every feature and population column (absent ones blank)."""
        columns = list(dict.fromkeys([*schema.feature_names, *schema.population, *self.record]))
        return pd.DataFrame([{c: self.record.get(c, math.nan) for c in columns}], columns=columns)


@dataclass
class _Column:
    name: str
    feature: Feature | None  # None: a population column that is not a feature
    values: dict[str, float | str]  # coded FHIR answer -> raw code
    raw: set[str]  # the raw codes themselves (normalised text), binary / categorical only

    @property
    def numeric(self) -> bool:
        return self.feature is None or self.feature.type == "numeric"


def _columns(schema: TableSchema) -> tuple[list[_Column], dict[str, _Column]]:
    """The columns a Bundle can fill, and "system|code" -> column."""
    cols: list[_Column] = []
    for f in schema.features:
        values: dict[str, float | str] = dict(f.fhir.values) if f.fhir else {}
        if not values and f.codes is not None:
            values = {k: getattr(f.codes, v) for k, v in _YES_NO.items()}
        raw = set(f.codes.mapping()) if f.codes else {str(_norm(c)) for c in f.categories or []}
        cols.append(_Column(f.name, f, values, raw if f.type != "numeric" else set()))
    names = set(schema.feature_names)
    cols += [_Column(c, None, {}, set()) for c in schema.population if c not in names]
    index: dict[str, _Column] = {}
    for c in cols:
        for code in [*(c.feature.fhir.codes if c.feature and c.feature.fhir else [])]:
            index.setdefault(code.strip(), c)
        index.setdefault(f"{FHIR_FEATURE_SYSTEM}|{c.name}", c)
    return cols, index


def _unit(u: str) -> str:
    return u.strip().lower().replace(" ", "").replace("^", "*").replace("µ", "u").replace("μ", "u")


def same_unit(schema_unit: str, ucum: str) -> bool:
    """Whether a Quantity's UCUM code is the schema's unit (spelling variants allowed)."""
    a, b = _unit(schema_unit), _unit(ucum)
    return a == b or any(a in g and b in g for g in _UNIT_GROUPS)


def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, dict) and c.get("code")]


def _keys(coding: dict[str, Any]) -> list[str]:
    code = str(coding["code"]).strip()
    return [f"{coding['system']}|{code}", code] if coding.get("system") else [code]


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _read_value(obs: dict[str, Any], col: _Column) -> float | str | None:
    """The raw value an Observation gives a column; None if it has no value."""
    present = [k for k in _VALUE_KEYS if k in obs]
    if not present:
        return None
    key, value = present[0], obs[present[0]]
    name = col.name
    if key == "valueQuantity":
        if not isinstance(value, dict):
            raise FhirInputError(f"{name}: valueQuantity is not a Quantity")
        number = _number(value.get("value"))
        if number is None:
            raise FhirInputError(f"{name}: valueQuantity has no numeric value")
        if value.get("comparator"):
            raise FhirInputError(f"{name}: a value with a comparator is not an exact value")
        unit = col.feature.unit if col.feature else ""
        code = value.get("code")
        if col.numeric and unit and isinstance(code, str) and not same_unit(unit, code):
            raise FhirInputError(
                f"{name}: unit {code!r} is not the schema's unit {unit!r} (nothing is converted)"
            )
        value, key = number, "valueInteger"  # a plain number from here on
    if col.numeric:
        if key != "valueInteger" or (number := _number(value)) is None:
            raise FhirInputError(f"{name}: expected a number (valueQuantity or valueInteger)")
        return number
    # binary / categorical: a mapped coded answer, or one of the table's raw codes
    if key == "valueBoolean":
        if not isinstance(value, bool):
            raise FhirInputError(f"{name}: valueBoolean is not true or false")
        answer = "true" if value else "false"
        if answer not in col.values:
            raise FhirInputError(f"{name}: valueBoolean has no code in this model")
        return col.values[answer]
    if key == "valueCodeableConcept":
        codings = _codings(value)
        for coding in codings:
            for k in _keys(coding):
                if k in col.values:
                    return col.values[k]
        for coding in codings:  # the table's own code, in the project's system
            code = str(_norm(str(coding["code"])))
            if coding.get("system") in (None, FHIR_FEATURE_SYSTEM) and code in col.raw:
                return _raw(coding["code"])
        raise FhirInputError(f"{name}: the coded answer is not one this model knows")
    if key in ("valueString", "valueInteger"):
        if key == "valueString" and isinstance(value, str) and value.strip() in col.values:
            return col.values[value.strip()]
        readable = isinstance(value, str | int | float) and not isinstance(value, bool)
        if readable and str(_norm(value)) in col.raw:
            return _raw(value)
        raise FhirInputError(f"{name}: the value is not one of this feature's codes")
    raise FhirInputError(f"{name}: {key} cannot give this feature's value")


def _raw(value: Any) -> float | str:
    """A raw table code as the CSV would hold it: a number as float, else text."""
    v = _norm(value)
    return float(v) if isinstance(v, int | float) else str(v)


def _subject_key(ref: Any) -> tuple[str, ...] | None:
    """Comparable key of a Reference: ("ref", "Patient/1") or ("identifier", system, value)."""
    if not isinstance(ref, dict):
        return None
    r = ref.get("reference")
    if isinstance(r, str) and r.strip():
        m = _PATIENT_REF.search(r.strip())
        return ("ref", m.group(1) if m else r.strip())
    ident = ref.get("identifier")
    if isinstance(ident, dict) and ident.get("value"):
        return ("identifier", str(ident.get("system") or ""), str(ident["value"]))
    return None


def _patient_keys(patient: dict[str, Any], full_url: str | None) -> set[tuple[str, ...]]:
    keys: set[tuple[str, ...]] = set()
    if patient.get("id"):
        keys.add(("ref", f"Patient/{patient['id']}"))
    if full_url:
        key = _subject_key({"reference": full_url})
        if key:
            keys.add(key)
    for ident in patient.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("value"):
            keys.add(("identifier", str(ident.get("system") or ""), str(ident["value"])))
    return keys


def _date(text: Any, what: str) -> date | None:
    """The calendar date of a FHIR dateTime / instant, as written; None if only a year or month."""
    if not isinstance(text, str):
        return None
    if len(text) < 10:
        return None
    try:
        return date.fromisoformat(text[:10])
    except ValueError:
        raise FhirInputError(f"{what}: not a FHIR date") from None  # the text is not echoed


def _effective(obs: dict[str, Any], name: str) -> date | None:
    period = obs.get("effectivePeriod")
    when = obs.get("effectiveDateTime") or obs.get("effectiveInstant")
    if when is None and isinstance(period, dict):
        when = period.get("start") or period.get("end")
    return _date(when, f"{name}: the Observation's effective time")


def _years(born: date, on: date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def age_in_years(birth_date: str, on: date) -> int | None:
    """Age in whole years on a date, from a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD); None when a
    partial birth date leaves it undecided. Raises FhirInputError (without the date)."""
    if not isinstance(birth_date, str) or not _FHIR_DATE.match(birth_date.strip()):
        raise FhirInputError("Patient.birthDate: not a FHIR date")
    parts = [int(p) for p in birth_date.strip().split("-")]
    try:
        if len(parts) == 3:
            first = last = date(*parts)
        elif len(parts) == 2:
            first = date(parts[0], parts[1], 1)
            last = date(parts[0], parts[1], calendar.monthrange(parts[0], parts[1])[1])
        else:
            first, last = date(parts[0], 1, 1), date(parts[0], 12, 31)
    except ValueError:
        raise FhirInputError("Patient.birthDate: not a valid date") from None
    if first > on:
        raise FhirInputError("Patient.birthDate is after the date the record is scored for")
    low, high = _years(last, on) if last <= on else 0, _years(first, on)
    return high if low == high else None


def _reference(resource: dict[str, Any], full_url: Any, what: str) -> dict[str, Any]:
    if resource.get("id"):
        return {"reference": f"{resource['resourceType']}/{resource['id']}"}
    if isinstance(full_url, str) and full_url:
        return {"reference": full_url}
    return {"display": what}


def records_from_bundle(
    bundle: dict[str, Any], schema: TableSchema, now: datetime | None = None
) -> FhirRecord:
    """Read one record from a FHIR R4 Bundle (one Patient at most, and Observations).

    `now`: the time of scoring, for the age when no Observation has an effective date (default:
    the local time now). Raises FhirInputError for what cannot be read at all."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise FhirInputError("expected a FHIR Bundle (resourceType 'Bundle')")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise FhirInputError("Bundle.entry is not a list")
    cols, index = _columns(schema)
    out = FhirRecord()
    patient: dict[str, Any] | None = None
    patient_url: str | None = None
    observations: list[tuple[dict[str, Any], Any]] = []
    skipped: dict[str, int] = {}
    for e in entries:
        resource = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(resource, dict):
            skipped["entries without a resource"] = skipped.get("entries without a resource", 0) + 1
            continue
        kind = resource.get("resourceType")
        if kind == "Patient":
            if patient is not None:
                raise FhirInputError("the Bundle holds more than one Patient")
            patient, patient_url = resource, e.get("fullUrl")
        elif kind == "Observation":
            observations.append((resource, e.get("fullUrl")))
        else:
            what = f"{kind} resources" if isinstance(kind, str) else "resources of no type"
            skipped[what] = skipped.get(what, 0) + 1
    out.notes += [f"{n} {what}: not used, ignored" for what, n in skipped.items()]

    # One subject: every Observation's, and the Patient's when there is one.
    subjects = {k for obs, _ in observations if (k := _subject_key(obs.get("subject")))}
    if len(subjects) > 1:
        raise FhirInputError("the Observations are about different subjects")
    patient_keys = _patient_keys(patient, patient_url) if patient else set()
    if patient is not None and subjects and not subjects <= patient_keys:
        raise FhirInputError("the Observations' subject is not the Bundle's Patient")

    found: dict[str, tuple[float | str, dict[str, Any]]] = {}
    dates: list[date] = []
    duplicates: dict[str, int] = {}
    for obs, full_url in observations:
        codings = _codings(obs.get("code"))
        keys = [k for c in codings for k in _keys(c) if "|" in k]
        col = next((index[k] for k in keys if k in index), None)
        label = col.name if col else ", ".join(keys[:3]) or "(no system|code)"
        status = obs.get("status")
        if status not in USABLE_STATUS:
            out.notes.append(f"Observation ({label}) with status {status!r}: ignored")
            continue
        if col is None:
            out.notes.append(f"Observation coded {label}: not used by this model, ignored")
            continue
        value = _read_value(obs, col)
        if value is None:
            why = " (dataAbsentReason given)" if obs.get("dataAbsentReason") else ""
            out.notes.append(f"{col.name}: Observation without a value{why}: left missing")
            continue
        when = _effective(obs, col.name)
        if col.name in found:
            if found[col.name][0] != value:
                raise FhirInputError(f"{col.name}: two Observations give different values")
            duplicates[col.name] = duplicates.get(col.name, 1) + 1
            continue
        found[col.name] = (value, _reference(obs, full_url, f"{col.name} Observation"))
        if when is not None:
            dates.append(when)
    for c, n in duplicates.items():
        out.notes.append(f"{c}: {n} Observations with the same value: one used")

    # Values from the Patient: where no Observation gave one, or checked against it.
    on = max(dates) if dates else (now or datetime.now().astimezone()).date()
    for col in cols:
        source = col.feature.fhir.patient if col.feature and col.feature.fhir else None
        if source is None or patient is None:
            continue
        pv: float | str | None = None
        if source == "gender":
            gender = patient.get("gender")
            if gender is None:
                continue
            if gender not in col.values:
                out.notes.append(f"{col.name}: Patient.gender has no code in this model: missing")
                continue
            pv = col.values[gender]
        elif patient.get("birthDate") is not None:
            years = age_in_years(patient["birthDate"], on)
            if years is None:
                out.notes.append(
                    f"{col.name}: Patient.birthDate too imprecise for whole years: missing"
                )
                continue
            pv = float(years)
            if col.name in found:
                given = found[col.name][0]
                if isinstance(given, float) and math.floor(given) != years:
                    raise FhirInputError(
                        f"{col.name}: the Observation and Patient.birthDate disagree"
                    )
                continue
            at = "the Observations' date" if dates else "the time of scoring"
            out.notes.append(f"{col.name}: from Patient.birthDate, at {at}")
        if pv is None:
            continue
        if col.name in found:
            if found[col.name][0] != pv:
                raise FhirInputError(f"{col.name}: the Observation and the Patient disagree")
            continue
        out.record[col.name] = pv
    for name, (value, ref) in found.items():
        out.record[name] = value
        out.basis.append(ref)
    order = [c.name for c in cols]
    out.record = {c: out.record[c] for c in order if c in out.record}
    out.subject = _subject(patient, observations)
    return out


def _subject(patient: dict[str, Any] | None, observations: list[Any]) -> dict[str, Any] | None:
    """A Reference to the patient: Patient/<id> (else the Observations' reference), with the
    Patient's first identifier. A urn: reference is dropped when an identifier can stand in."""
    ref: dict[str, Any] = {}
    if patient is not None and patient.get("id"):
        ref["reference"] = f"Patient/{patient['id']}"
    else:
        for obs, _ in observations:
            s = obs.get("subject")
            if isinstance(s, dict) and isinstance(s.get("reference"), str):
                ref["reference"] = s["reference"].strip()
                break
    idents = [i for i in (patient or {}).get("identifier") or [] if isinstance(i, dict)]
    ident = next((i for i in idents if i.get("value")), None)
    if ident is None and not patient:
        for obs, _ in observations:
            s = obs.get("subject")
            if isinstance(s, dict) and isinstance(s.get("identifier"), dict):
                ident = s["identifier"]
                break
    if ident is not None:
        ref["identifier"] = {k: ident[k] for k in ("system", "value") if ident.get(k)}
        if str(ref.get("reference", "")).startswith("urn:"):
            del ref["reference"]
    return ref or None


def _record_id(view: dict[str, Any]) -> dict[str, Any]:
    return {"system": RECORD_SYSTEM, "value": str(view["id"])}


def _outcome_concept(label: str) -> dict[str, Any]:
    concept: dict[str, Any] = {"text": label}
    if label in OUTCOMES:
        system, code, display = OUTCOMES[label]
        concept["coding"] = [{"system": system, "code": code, "display": display}]
    return concept


def risk_assessment(view: dict[str, Any]) -> dict[str, Any]:
    """A FHIR R4 RiskAssessment for a scored record's view (a refused one has none: see
    `operation_outcome`)."""
    if view.get("status") != "scored":
        raise ValueError(f"record {view.get('id')} is {view.get('status')}: no RiskAssessment")
    label = view.get("label") or "risk"
    version = view.get("model_version") or "unregistered"
    sha = view.get("model_sha256") or ""
    coding: dict[str, Any] = {"system": MODEL_SYSTEM, "code": str(view["model"]).strip()}
    if view.get("model_version"):
        coding["version"] = str(view["model_version"])
    coding["display"] = str(view.get("model_name") or view["model"])
    p, raw = view.get("probability"), view.get("raw_probability")
    category, threshold = view.get("category"), float(view["threshold"])

    prediction: dict[str, Any] = {"outcome": _outcome_concept(label)}
    if p is not None:
        prediction["probabilityDecimal"] = float(p)
    if category in _RISK_DISPLAY:
        prediction["qualitativeRisk"] = {
            "coding": [
                {"system": RISK_PROBABILITY, "code": category, "display": _RISK_DISPLAY[category]}
            ],
            "text": category,
        }
    rationale = f"operating threshold {threshold:.3f}: high at or above it, low below it."
    if p is not None and category:
        rationale = f"{category.capitalize()}: probability {p:.3f}; {rationale}"
    else:
        rationale = rationale.capitalize()
    recalibrated = view.get("profile_id") is not None or (
        raw is not None and p is not None and abs(float(raw) - float(p)) > 1e-9
    )
    if recalibrated:
        rationale += " Site recalibration applied"
        if view.get("profile_id") is not None:
            rationale += f" (site profile {view['profile_id']})"
        rationale += f"; the model's own probability was {raw:.3f}." if raw is not None else "."
    else:
        rationale += " No site recalibration: the model's own calibration."
    prediction["rationale"] = rationale

    imputed = list(view.get("imputed") or [])
    notes: list[dict[str, Any]] = [
        {
            "text": (
                f"Not provided, so filled in by the model's imputation: {', '.join(imputed)}. "
                "The estimate is less reliable with values missing."
            )
            if imputed
            else "Every predictor was provided: nothing was imputed."
        },
        {
            "text": f"Decision support, not a diagnosis: an estimated probability of {label}, "
            "to be weighed by the clinician with the whole clinical picture."
        },
    ]
    if view.get("reasons"):
        notes.append({"text": "; ".join(view["reasons"])})
    outcome = view.get("outcome")
    if outcome:
        said = {True: "confirmed", False: "not confirmed", None: "unknown"}[outcome.get("value")]
        note: dict[str, Any] = {"text": f"Outcome recorded: {label} {said}."}
        if outcome.get("recorded_at"):
            note["time"] = outcome["recorded_at"]
        if outcome.get("by"):
            note["authorString"] = str(outcome["by"])
        notes.append(note)

    out: dict[str, Any] = {"resourceType": "RiskAssessment"}
    if _FHIR_ID.match(str(view["id"])):
        out["id"] = str(view["id"])
    out |= {
        "identifier": [_record_id(view)],
        "status": "final",
        "method": {
            "coding": [coding],
            "text": f"{coding['display']} version {version}, sha256 {sha[:12]}",
        },
        "code": {"text": f"{label} risk (AI decision support)"},
        "subject": view.get("subject") or {"display": "not identified"},
        "occurrenceDateTime": view["created_at"],
    }
    if view.get("basis"):
        out["basis"] = list(view["basis"])
    out["prediction"] = [prediction]
    out["note"] = notes
    return out


def operation_outcome(view: dict[str, Any]) -> dict[str, Any]:
    """A FHIR R4 OperationOutcome saying why a record was refused (it has no risk)."""
    if view.get("status") == "scored":
        raise ValueError(f"record {view.get('id')} was scored: use risk_assessment")
    code = view.get("code")
    details: dict[str, Any] = {
        "text": f"Record {view['id']}: refused by {view.get('model')}; no risk was computed."
    }
    if code:
        details["coding"] = [{"system": REFUSAL_SYSTEM, "code": str(code)}]
    out: dict[str, Any] = {"resourceType": "OperationOutcome"}
    if _FHIR_ID.match(str(view["id"])):
        out["id"] = str(view["id"])
    out["issue"] = [
        {
            "severity": "error",
            "code": _REFUSAL_ISSUE.get(str(code), "processing"),
            "details": details,
            "diagnostics": "; ".join(view.get("reasons") or []) or "refused",
        }
    ]
    return out


def response_bundle(views: list[dict[str, Any]]) -> dict[str, Any]:
    """A collection Bundle: a RiskAssessment per scored record, an OperationOutcome per refused."""
    entries = []
    for v in views:
        resource = risk_assessment(v) if v.get("status") == "scored" else operation_outcome(v)
        key = uuid.uuid5(uuid.NAMESPACE_URL, f"{RECORD_SYSTEM}/{v['id']}")
        entries.append({"fullUrl": f"urn:uuid:{key}", "resource": resource})
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "entry": entries,
    }
