"""FHIR R4 in and out for clinic risk scoring (`POST /v1/risk/{model}`). Torch-free, plain dicts:
fhir.resources is not a runtime dependency (the tests validate with it).

In (`records_from_bundle`): a Bundle of any type with at most one Patient and that patient's
Observations -> one record keyed by column name, holding raw values as a CSV row of the model's
table would (numbers as floats, yes/no as the table's raw codes), ready for
`tables.validate_records`. Each feature's `fhir` mapping (`tables.FhirMapping`) names the
Observation codes that carry it, or says it comes from Patient.gender / Patient.birthDate; an
Observation coded `FHIR_FEATURE_SYSTEM|<column name>` is always read as that column (features
and population columns alike). Nothing is converted: a Quantity coded in another UCUM unit than
the schema's is refused; one without a UCUM code (many HIS send only `unit`) is read by its unit
text, whose usual spellings are known ("10^3/µL", "G/L", "°C", "years"...): a unit of another
kind (months for years, mg/dL for g/L, /mm3 for 10^9/L) or one not known at all is refused, with
the unit to send. Observations with status entered-in-error, cancelled (or anything but
final / amended / corrected / preliminary) are ignored and the record's `notes` say so, as they
say what else was ignored. Several Observations of one column (serial platelet counts): the
latest by effectiveDateTime / effectivePeriod.end / issued is used, and a note says how many
earlier values were left out; differing values that no time orders are refused. What cannot be
read, a wrong JSON type where an element is read included, raises `FhirInputError` (never a
TypeError), whose message names the column and the problem, never the patient (no names,
identifiers or dates: it may be logged).

Out: `risk_assessment` (a scored record -> RiskAssessment), `operation_outcome` (a refused
record -> OperationOutcome), `response_bundle` (a collection Bundle of either, one per record).
The record's notes (`view["notes"]`) go with it: RiskAssessment.note, or warning issues.
"""

from __future__ import annotations

import calendar
import math
import re
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
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
UCUM = "http://unitsofmeasure.org"
# What a unit measures, by its UCUM code -> its spellings once normalised by `_unit` (lower case,
# no spaces, ^ -> *, µ -> u, superscripts and UCUM annotations {...} dropped, x10^9 -> 10*9,
# mm3 -> ul). A unit known here but of another kind than the schema's is refused, naming both; a
# unit not known here is refused too (send the schema's unit): nothing is guessed or converted.
_UNIT_KINDS: dict[str, tuple[str, ...]] = {
    "10*9/L": (
        "10*9/l", "10*3/ul", "/nl", "giga/l", "gpt/l", "k/ul", "thou/ul", "th/ul",
    ),
    "/uL": ("/ul",),  # per microlitre (= per mm3): a count 1000 times the 10^9/L one
    "10*12/L": ("10*12/l", "10*6/ul", "m/ul", "mill/ul", "t/l", "tpt/l"),
    "%": ("%", "percent", "pct"),
    "L/L": ("l/l",),
    "a": ("a", "y", "yr", "yrs", "year", "years", "năm", "tuổi"),
    "mo": ("mo", "mos", "month", "months", "mth", "mths", "tháng"),
    "wk": ("wk", "wks", "week", "weeks", "tuần"),
    "d": ("d", "day", "days", "dayofillness", "ngày"),
    "h": ("h", "hr", "hrs", "hour", "hours", "giờ"),
    "Cel": ("cel", "°c", "degc", "deg.c", "c", "oc", "celsius", "độc"),
    "[degF]": ("degf", "°f", "deg.f", "f", "of", "fahrenheit"),
    "g/L": ("g/l",),
    "g/dL": ("g/dl",),
    "mg/dL": ("mg/dl",),
    "mg/L": ("mg/l",),
    "mmol/L": ("mmol/l",),
    "umol/L": ("umol/l",),
    "U/L": ("u/l", "iu/l", "ui/l", "units/l"),
    "ukat/L": ("ukat/l",),
    "uU/mL": ("uu/ml", "uiu/ml", "miu/l", "mu/l"),
    "kg/m2": ("kg/m2",),
    "cm": ("cm", "centimeter", "centimeters", "centimetre", "centimetres"),
    "m": ("m", "meter", "meters", "metre", "metres"),
    "mm": ("mm", "millimeter", "millimeters", "millimetre", "millimetres"),
    "[in_i]": ("in", "in_i", "inch", "inches"),
    "kg": ("kg", "kgs", "kilogram", "kilograms"),
    "g": ("g", "gram", "grams"),
    "[lb_av]": ("lb", "lbs", "lb_av", "pound", "pounds"),
    "mm[Hg]": ("mmhg",),
    "/min": ("/min", "beats/min", "beat/min", "bpm"),
}  # fmt: skip
_UNIT_KIND = {spelling: ucum for ucum, spellings in _UNIT_KINDS.items() for spelling in spellings}
_SUPERSCRIPTS = str.maketrans({c: f"*{i}" for i, c in enumerate("⁰¹²³⁴⁵⁶⁷⁸⁹")})
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
    """A unit spelling, normalised (see `_UNIT_KINDS`). "G/L" (giga per litre, a cell count) is
    told from "g/L" (grams per litre) by its capital G: the one place where case matters."""
    s = unicodedata.normalize("NFKC", u.translate(_SUPERSCRIPTS))
    s = re.sub(r"\{[^}]*\}", "", s)  # UCUM annotations: {cells}/uL -> /uL
    s = re.sub(r"\s+", "", s)
    if re.fullmatch(r"G/[lL]", s):
        return "giga/l"
    s = s.lower().replace("μ", "u").replace("×", "x").replace("^", "*").replace("**", "*")
    s = re.sub(r"[\[\]]|cells?", "", s)  # [iU]/L -> iu/l; 10^9 cells/L -> 10*9/l
    s = re.sub(r"^x(?=10)", "", s)  # x10^9/L
    s = re.sub(r"^10e\+?(?=\d)", "10*", s)  # 10E9/L
    s = re.sub(r"(?<=[a-z])\*(?=\d)", "", s)  # mm^3 -> mm3, m^2 -> m2
    return re.sub(r"/(mm3|cumm|cmm)$", "/ul", s)


def unit_kind(u: str) -> str | None:
    """The UCUM code of what a unit spelling measures ("10^3/µL" -> "10*9/L"); None if unknown."""
    return _UNIT_KIND.get(_unit(u))


def same_unit(schema_unit: str, other: str) -> bool:
    """Whether a Quantity's unit (UCUM code or text) is the schema's unit (spellings vary)."""
    a, b = _unit(schema_unit), _unit(other)
    return a == b or (_UNIT_KIND.get(a) is not None and _UNIT_KIND.get(a) == _UNIT_KIND.get(b))


def _shown(text: Any, limit: int = 32) -> str:
    """A sender's code or unit, quoted for a message; cut short, and only if it is text."""
    if not isinstance(text, str):
        return "(not text)"
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _check_unit(quantity: dict[str, Any], schema_unit: str, name: str) -> None:
    """Refuse a Quantity whose unit is not the schema's: its UCUM `code` when it has one, else
    its `unit` text. A Quantity with neither is a plain number (as a valueInteger is)."""
    parts = {k: quantity.get(k) for k in ("code", "unit", "system")}
    for k, v in parts.items():
        if v is not None and not isinstance(v, str):
            raise FhirInputError(f"{name}: valueQuantity.{k} is not text")
    code, text = (parts["code"] or "").strip(), (parts["unit"] or "").strip()
    kind = unit_kind(schema_unit)
    ask = f"send the value in {schema_unit!r}" + (
        f" (UCUM code {kind!r})" if kind and kind != schema_unit else ""
    )
    if code:
        if same_unit(schema_unit, code):
            return
        if not text or parts["system"] in (None, "", UCUM):
            raise FhirInputError(
                f"{name}: unit {_shown(code)} is not the schema's unit {schema_unit!r} "
                f"(nothing is converted): {ask}"
            )
        # a unit code of another system than UCUM: its text says what the unit is
    if not text or same_unit(schema_unit, text):
        return
    if unit_kind(text) is not None:
        raise FhirInputError(
            f"{name}: unit {_shown(text)} is not the schema's unit {schema_unit!r} "
            f"(nothing is converted): {ask}"
        )
    raise FhirInputError(f"{name}: unit {_shown(text)} is not a unit this service knows: {ask}")


def _codings(concept: Any, what: str) -> list[dict[str, Any]]:
    """The codings of a CodeableConcept that have a code; FhirInputError if it is not one."""
    if concept is None:
        return []
    coding = concept.get("coding") if isinstance(concept, dict) else None
    if not isinstance(concept, dict) or not isinstance(coding, list | None):
        raise FhirInputError(f"{what} is not a CodeableConcept")
    out = []
    for c in coding or []:
        if not isinstance(c, dict):
            raise FhirInputError(f"{what}: a coding is not a Coding")
        code, system = c.get("code"), c.get("system")
        if isinstance(code, bool) or not isinstance(code, str | int | None):
            raise FhirInputError(f"{what}: a coding's code is not text")
        if not isinstance(system, str | None):
            raise FhirInputError(f"{what}: a coding's system is not text")
        if code is not None and str(code).strip():
            out.append(c)
    return out


def _keys(coding: dict[str, Any]) -> list[str]:
    code = str(coding["code"]).strip()
    system = (coding.get("system") or "").strip()
    return [f"{system}|{code}", code] if system else [code]


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        v = float(v)
    except OverflowError:  # an integer past any float
        return None
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
        if col.numeric and unit:
            _check_unit(value, unit, name)
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
        codings = _codings(value, f"{name}: valueCodeableConcept")
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


def _subject_key(ref: Any, what: str = "Observation.subject") -> tuple[str, ...] | None:
    """Comparable key of a Reference: ("ref", "Patient/1") or ("identifier", system, value)."""
    if ref is None:
        return None
    if not isinstance(ref, dict):
        raise FhirInputError(f"{what} is not a Reference")
    r, ident = ref.get("reference"), ref.get("identifier")
    if not isinstance(r, str | None):
        raise FhirInputError(f"{what}.reference is not text")
    if r is not None and r.strip():
        m = _PATIENT_REF.search(r.strip())
        return ("ref", m.group(1) if m else r.strip())
    if ident is None:
        return None
    return _identifier_key(ident, f"{what}.identifier")


def _identifier_key(ident: Any, what: str) -> tuple[str, ...] | None:
    if not isinstance(ident, dict):
        raise FhirInputError(f"{what} is not an Identifier")
    system, value = ident.get("system"), ident.get("value")
    if not isinstance(system, str | None) or not isinstance(value, str | None):
        raise FhirInputError(f"{what}: its system or value is not text")
    return ("identifier", system or "", value) if value else None


def _patient_keys(patient: dict[str, Any], full_url: Any) -> set[tuple[str, ...]]:
    keys: set[tuple[str, ...]] = set()
    if patient.get("id"):
        keys.add(("ref", f"Patient/{patient['id']}"))
    if isinstance(full_url, str) and full_url.strip():
        keys.add(("ref", m.group(1) if (m := _PATIENT_REF.search(full_url)) else full_url))
    for ident in _identifiers(patient):
        if key := _identifier_key(ident, "Patient.identifier"):
            keys.add(key)
    return keys


def _identifiers(patient: dict[str, Any]) -> list[Any]:
    idents = patient.get("identifier")
    if idents is None:
        return []
    if not isinstance(idents, list):
        raise FhirInputError("Patient.identifier is not a list")
    return idents


def _date(text: Any, what: str) -> date | None:
    """The calendar date of a FHIR dateTime / instant, as written; None if only a year or month."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise FhirInputError(f"{what}: not a FHIR date")
    if len(text) < 10:
        return None
    try:
        return date.fromisoformat(text[:10])
    except ValueError:
        raise FhirInputError(f"{what}: not a FHIR date") from None  # the text is not echoed


def _period(obs: dict[str, Any], name: str) -> dict[str, Any]:
    period = obs.get("effectivePeriod")
    if not isinstance(period, dict | None):
        raise FhirInputError(f"{name}: the Observation's effectivePeriod is not a Period")
    return period or {}


def _effective(obs: dict[str, Any], name: str) -> date | None:
    """The Observation's date, for the age: effective[DateTime|Instant], else its period's
    (start first), else the date it was issued."""
    period = _period(obs, name)
    when = obs.get("effectiveDateTime") or obs.get("effectiveInstant")
    if when is None:
        when = period.get("start") or period.get("end")
    if when is None and obs.get("issued") is not None:
        return _date(obs["issued"], f"{name}: the Observation's issued time")
    return _date(when, f"{name}: the Observation's effective time")


_SLACK = timedelta(hours=14)  # a time without a zone, or a date: it could be in any time zone


def _interval(text: Any, what: str) -> tuple[datetime, datetime]:
    """A FHIR date, dateTime or instant as the UTC interval it may stand for: an instant for a
    time with a zone; a day, month or year (widened by every time zone) otherwise."""
    if not isinstance(text, str):
        raise FhirInputError(f"{what}: not a FHIR date")
    s = text.strip()
    try:
        if "T" in s:
            t = datetime.fromisoformat(s)
            if t.tzinfo is None:  # not FHIR (a time needs a zone): any zone
                t = t.replace(tzinfo=UTC)
                return t - _SLACK, t + _SLACK
            t = t.astimezone(UTC)
            return t, t
        if not _FHIR_DATE.fullmatch(s):
            raise ValueError
        parts = [int(p) for p in s.split("-")]
        first = date(parts[0], parts[1] if len(parts) > 1 else 1, parts[2] if len(parts) > 2 else 1)
        if len(parts) == 3:
            after = first + timedelta(days=1)
        elif len(parts) == 2:
            after = date(first.year + first.month // 12, first.month % 12 + 1, 1)
        else:
            after = date(first.year + 1, 1, 1)
        lo = datetime(first.year, first.month, first.day, tzinfo=UTC)
        hi = datetime(after.year, after.month, after.day, tzinfo=UTC)
        return lo - _SLACK, hi + _SLACK
    except (ValueError, OverflowError):
        raise FhirInputError(f"{what}: not a FHIR date") from None  # the text is not echoed


def _when(obs: dict[str, Any], name: str) -> tuple[datetime, datetime] | None:
    """When an Observation was made, to tell serial results apart: effectiveDateTime (or
    effectiveInstant), else the end of effectivePeriod (its start without one), else issued."""
    period = _period(obs, name)
    for what, text in (
        ("effective time", obs.get("effectiveDateTime") or obs.get("effectiveInstant")),
        ("effective time", period.get("end") or period.get("start")),
        ("issued time", obs.get("issued")),
    ):
        if text is not None:
            return _interval(text, f"{name}: the Observation's {what}")
    return None


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
    rid = resource.get("id")
    if isinstance(rid, str) and _FHIR_ID.fullmatch(rid):
        return {"reference": f"{resource['resourceType']}/{rid}"}
    if isinstance(full_url, str) and full_url.strip():
        return {"reference": full_url.strip()}
    return {"display": what}


@dataclass
class _Reading:
    """One Observation's value for a column."""

    value: float | str
    ref: dict[str, Any]
    when: tuple[datetime, datetime] | None  # when it was made (UTC interval), if said
    day: date | None  # its date as written, for the age


def _latest(name: str, readings: list[_Reading], notes: list[str]) -> _Reading:
    """The reading to use when several Observations give a column: the latest (serial platelet
    counts are routine); the same value more than once is one value. Differing values with the
    same time, or without one, cannot be told apart: FhirInputError."""
    if len(readings) == 1:
        return readings[0]
    candidates = [
        r
        for r in readings
        if all(
            o.value == r.value or (r.when and o.when and o.when[1] < r.when[0]) for o in readings
        )
    ]
    if not candidates:
        raise FhirInputError(
            f"{name}: two Observations give different values, at the same time or without a "
            "time to tell the latest (effectiveDateTime, effectivePeriod.end or issued)"
        )
    pick = candidates[0]  # the latest of them (the first of equals); none timed: the first
    for r in candidates:
        if r.when is not None and (pick.when is None or r.when[0] > pick.when[0]):
            pick = r
    earlier = sum(o.value != pick.value for o in readings)
    if earlier:
        values = "value" if earlier == 1 else "values"
        notes.append(
            f"{name}: {len(readings)} Observations at different times: the latest used, "
            f"{earlier} earlier {values} left out"
        )
    else:
        notes.append(f"{name}: {len(readings)} Observations with the same value: one used")
    return pick


def records_from_bundle(
    bundle: dict[str, Any], schema: TableSchema, now: datetime | None = None
) -> FhirRecord:
    """Read one record from a FHIR R4 Bundle (one Patient at most, and Observations).

    `now`: the time of scoring, for the age when no Observation has an effective date (default:
    the local time now). Raises FhirInputError for what cannot be read at all, a wrong JSON
    type where a FHIR element is read included (never a TypeError)."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise FhirInputError("expected a FHIR Bundle (resourceType 'Bundle')")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise FhirInputError("Bundle.entry is not a list")
    cols, index = _columns(schema)
    out = FhirRecord()
    patient: dict[str, Any] | None = None
    patient_url: Any = None
    observations: list[tuple[dict[str, Any], Any]] = []
    skipped: dict[str, int] = {}
    for e in entries:
        resource = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(resource, dict):
            skipped["entries without a resource"] = skipped.get("entries without a resource", 0) + 1
            continue
        kind = resource.get("resourceType")
        full_url = e.get("fullUrl") if isinstance(e.get("fullUrl"), str) else None
        if kind == "Patient":
            if patient is not None:
                raise FhirInputError("the Bundle holds more than one Patient")
            patient, patient_url = resource, full_url
        elif kind == "Observation":
            observations.append((resource, full_url))
        else:
            what = f"{kind} resources" if isinstance(kind, str) else "resources of no type"
            skipped[what] = skipped.get(what, 0) + 1
    out.notes += [f"{n} {what}: not used, ignored" for what, n in skipped.items()]
    if patient is not None:
        pid = patient.get("id")
        if pid is not None and not (isinstance(pid, str) and _FHIR_ID.fullmatch(pid)):
            raise FhirInputError("Patient.id is not a FHIR id")

    # One subject: every Observation's, and the Patient's when there is one (the Patient's id
    # and its identifiers name the same subject).
    subjects = {k for obs, _ in observations if (k := _subject_key(obs.get("subject")))}
    patient_keys = _patient_keys(patient, patient_url) if patient else set()
    if len(subjects) > 1 and not (patient is not None and subjects <= patient_keys):
        raise FhirInputError("the Observations are about different subjects")
    if patient is not None and subjects and not subjects <= patient_keys:
        raise FhirInputError("the Observations' subject is not the Bundle's Patient")

    readings: dict[str, list[_Reading]] = {}
    for obs, full_url in observations:
        codings = _codings(obs.get("code"), "Observation.code")
        keys = [k for c in codings for k in _keys(c) if "|" in k]
        col = next((index[k] for k in keys if k in index), None)
        label = col.name if col else ", ".join(keys[:3]) or "(no system|code)"
        status = obs.get("status")
        if status not in USABLE_STATUS:
            out.notes.append(f"Observation ({label}) with status {_shown(status)}: ignored")
            continue
        if col is None:
            out.notes.append(f"Observation coded {label}: not used by this model, ignored")
            continue
        value = _read_value(obs, col)
        if value is None:
            why = " (dataAbsentReason given)" if obs.get("dataAbsentReason") else ""
            out.notes.append(f"{col.name}: Observation without a value{why}: left missing")
            continue
        ref = _reference(obs, full_url, f"{col.name} Observation")
        reading = _Reading(value, ref, _when(obs, col.name), _effective(obs, col.name))
        readings.setdefault(col.name, []).append(reading)
    found: dict[str, tuple[float | str, dict[str, Any]]] = {}
    dates: list[date] = []
    for name, rs in readings.items():
        pick = _latest(name, rs, out.notes)
        found[name] = (pick.value, pick.ref)
        if pick.day is not None:
            dates.append(pick.day)

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
            if not isinstance(gender, str):
                raise FhirInputError(f"{col.name}: Patient.gender is not a code")
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
    Patient's first identifier. A urn: reference is dropped when an identifier can stand in.
    Called once the Bundle is read: the types are checked."""
    ref: dict[str, Any] = {}
    if patient is not None and patient.get("id"):
        ref["reference"] = f"Patient/{patient['id']}"
    else:
        for obs, _ in observations:
            s = obs.get("subject")
            if isinstance(s, dict) and isinstance(s.get("reference"), str) and s["reference"]:
                ref["reference"] = s["reference"].strip()
                break
    idents = [i for i in _identifiers(patient or {}) if isinstance(i, dict)]
    ident = next((i for i in idents if i.get("value")), None)
    if ident is None and not patient:
        for obs, _ in observations:
            s = obs.get("subject")
            if isinstance(s, dict) and isinstance(s.get("identifier"), dict):
                ident = s["identifier"]
                break
    if ident is not None:
        ref["identifier"] = {
            k: ident[k] for k in ("system", "value") if isinstance(ident.get(k), str) and ident[k]
        }
        if not ref["identifier"]:
            del ref["identifier"]
        elif str(ref.get("reference", "")).startswith("urn:"):
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


def view_notes(view: dict[str, Any]) -> list[str]:
    """The notes stored with a record (what the Bundle left out, and why); [] if none."""
    notes = view.get("notes")
    if not isinstance(notes, list):
        return []
    return [n.strip() for n in notes if isinstance(n, str) and n.strip()]


def _calibration_text(view: dict[str, Any]) -> str:
    """What the site's profile changed: the probability (recalibrated for the site), the
    threshold (the site's own, whenever a profile was applied), both, or neither."""
    p, raw, profile = view.get("probability"), view.get("raw_probability"), view.get("profile_id")
    if raw is not None and p is not None and abs(float(raw) - float(p)) > 1e-9:
        said = f"Probability recalibrated for the site (the model's own was {float(raw):.3f})"
        if profile is not None:
            return f"{said}; operating threshold: the site's own (site profile {profile})."
        return f"{said}; operating threshold: the model's own."
    if profile is not None:
        return (
            f"Operating threshold: the site's own (site profile {profile}); the probability is "
            "the model's own, not recalibrated."
        )
    return "No site recalibration: the model's own probability and threshold."


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
    p = view.get("probability")
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
    prediction["rationale"] = rationale + " " + _calibration_text(view)

    imputed = list(view.get("imputed") or [])
    fhir_notes = view_notes(view)
    missing = "Not provided or not usable (see notes)" if fhir_notes else "Not provided"
    notes: list[dict[str, Any]] = [
        {
            "text": (
                f"{missing}, so filled in by the model's imputation: {', '.join(imputed)}. "
                "The estimate is less reliable with values missing."
            )
            if imputed
            else "Every predictor was provided: nothing was imputed."
        },
        *({"text": f"As read from the FHIR Bundle: {n}"} for n in fhir_notes),
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
        },
        *(
            {
                "severity": "warning",
                "code": "informational",
                "diagnostics": f"As read from the FHIR Bundle: {n}",
            }
            for n in view_notes(view)
        ),
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
