"""Clinical tables: a YAML schema per table, and loading that validates every row against it.

Shared by both sides (numpy, pandas and pydantic only): training reads CSVs with it, the clinic
validates the records it scores with the same schema.

The schema gives, per feature, its type, unit, plausible range (outside it: an error, or
missing), the values that mean "missing" (Pima's zeros) and the allowed categories; then the
outcome and the rule that makes it binary (`num > 0`), subgroup columns and an optional site
column. Loading never crashes on bad rows and never drops a row silently: every problem is
counted by column and reason, and rejected rows are counted and listed by row number, each with
a stable refusal code (`REFUSAL_CODES`).

Tables that code yes/no as 1/2 say so: a binary feature's `codes: {yes: 1, no: 2}` (and the
outcome's) are mapped to 1/0 here, so the pipeline and its ONNX graph only ever see 0/1.
The intended population (`population: {Age: [1, 15]}`) is checked before anything else: a row
outside it is refused (`outside_intended_population`), never scored, and a row without the value
is refused too (`population_unknown`). The outcome's `definition` lists the columns the
reference standard was built from; none of them may be a feature.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_OPS = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
# Why a row was refused, in codes that stay stable (clinic IT and reports key on them); the
# first that applies wins.
OUTSIDE_POPULATION = "outside_intended_population"  # a population value outside its range
POPULATION_UNKNOWN = "population_unknown"  # a population value missing, or the column absent
INVALID_VALUE = "invalid_value"  # a feature not a number, implausible, or not an allowed code
OUTCOME_MISSING = "outcome_missing"  # training/evaluation only: no usable outcome
REFUSAL_CODES = (OUTSIDE_POPULATION, POPULATION_UNKNOWN, INVALID_VALUE, OUTCOME_MISSING)

_RULE = re.compile(r"^\s*([A-Za-z_][\w]*)?\s*(>=|<=|==|!=|>|<)\s*(-?\d+(\.\d+)?)\s*$")


class YesNoCodes(BaseModel):
    """The raw codes of a yes/no column (e.g. 1 yes / 2 no); mapped to 1 / 0 on validation."""

    model_config = ConfigDict(extra="forbid")

    yes: float | str
    no: float | str

    @model_validator(mode="before")
    @classmethod
    def _yaml_booleans(cls, data: Any) -> Any:
        # YAML 1.1 reads the keys `yes` and `no` as true and false
        if isinstance(data, dict):
            names = {True: "yes", False: "no"}
            return {names.get(k, k) if isinstance(k, bool) else k: v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _distinct(self) -> YesNoCodes:
        if str(_norm(self.yes)) == str(_norm(self.no)):
            raise ValueError("codes: yes and no must differ")
        return self

    def mapping(self) -> dict[str, float]:
        """Normalised raw code (as text) -> 1.0 / 0.0."""
        return {str(_norm(self.yes)): 1.0, str(_norm(self.no)): 0.0}


# An Observation coded in this system with code == a feature's (or population column's) name is
# always read as that column, whatever the feature's own `fhir` mapping says.
FHIR_FEATURE_SYSTEM = "https://diagnostics.example/fhir/CodeSystem/risk-feature"


class FhirMapping(BaseModel):
    """Where a feature's value comes from in a FHIR R4 Bundle (`diagnostics.serve.risk_fhir`).

    `codes`: "system|code" of Observations that carry it (e.g. "http://loinc.org|6690-2"); a
    valueQuantity must be in the schema's unit (10^9/L, g/L, ...): nothing is converted.
    `patient`: read from the Patient instead: "gender", or "age" (whole years from birthDate at
    the Observations' date). `values`: coded FHIR answer ("code" or "system|code", "true"/"false"
    for valueBoolean, a Patient.gender) -> the raw table code. Whatever the mapping, an
    Observation coded `FHIR_FEATURE_SYSTEM|<feature name>` is read as the feature too.
    """

    model_config = ConfigDict(extra="forbid")

    codes: list[str] = Field(default_factory=list, description='"system|code" of Observations')
    patient: Literal["gender", "age"] | None = None
    values: dict[str, float | str] = Field(
        default_factory=dict, description="coded FHIR answer -> raw table code"
    )

    @field_validator("codes")
    @classmethod
    def _system_code(cls, v: list[str]) -> list[str]:
        for c in v:
            system, _, code = c.partition("|")
            if not system.strip() or not code.strip():
                raise ValueError(f"{c!r}: a code is 'system|code'")
        return v

    @field_validator("values", mode="before")
    @classmethod
    def _yaml_keys(cls, v: Any) -> Any:
        # YAML reads the keys true / false (and yes / no) as booleans: FHIR says "true"/"false"
        if isinstance(v, dict):
            return {(str(k).lower() if isinstance(k, bool) else str(k)): x for k, x in v.items()}
        return v


class Feature(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    type: Literal["numeric", "categorical", "binary"]
    unit: str = ""
    description: str = ""
    range: tuple[float, float] | None = Field(None, description="plausible [low, high]")
    out_of_range: Literal["error", "missing"] = "error"
    missing_values: list[float | str] = Field(default_factory=list)
    categories: list[float | str] | None = None
    codes: YesNoCodes | None = Field(
        None, description="binary only: raw codes, e.g. {yes: 1, no: 2}; the model sees 1/0"
    )
    fhir: FhirMapping | None = Field(None, description="how to read it from FHIR R4 (optional)")

    @model_validator(mode="after")
    def _check(self) -> Feature:
        if self.codes is not None and self.type != "binary":
            raise ValueError(f"{self.name}: codes are for binary features")
        if self.type == "categorical" and not self.categories:
            raise ValueError(f"{self.name}: a categorical feature needs categories")
        if self.type == "binary":
            if self.categories is None:
                self.categories = [0.0, 1.0]
            if len(self.categories) != 2 or not all(
                isinstance(c, int | float) for c in self.categories
            ):
                raise ValueError(f"{self.name}: a binary feature has two numeric categories")
        if self.range is not None and self.range[0] > self.range[1]:
            raise ValueError(f"{self.name}: range low > high")
        return self


class Outcome(BaseModel):
    model_config = ConfigDict(extra="forbid")

    column: str
    rule: str = Field("== 1", description="makes the outcome binary, e.g. 'num > 0'")
    label: str = Field("risk", description="name of the predicted finding")
    description: str = ""
    codes: YesNoCodes | None = Field(
        None, description="raw yes/no codes (e.g. {yes: 1, no: 2}): mapped to 1/0 before the rule"
    )
    definition: list[str] = Field(
        default_factory=list,
        description="columns the reference standard is built from: never features",
    )

    @field_validator("rule")
    @classmethod
    def _rule(cls, v: str) -> str:
        if not _RULE.match(v):
            raise ValueError("rule must look like '> 0', '== 1' or 'num > 0'")
        return v

    def apply(self, values: pd.Series) -> pd.Series:
        """1.0 / 0.0 by the rule; NaN where the outcome is missing (or not one of its codes)."""
        m = _RULE.match(self.rule)
        assert m is not None
        op, threshold = _OPS[m.group(2)], float(m.group(3))
        numeric = self.numeric(values)
        return op(numeric, threshold).astype(float).where(numeric.notna())

    def numeric(self, values: pd.Series) -> pd.Series:
        """The raw outcome as numbers; with codes, yes -> 1, no -> 0 and anything else NaN."""
        if self.codes is None:
            return pd.to_numeric(values, errors="coerce")
        mapping = self.codes.mapping()
        return values.map(lambda v: mapping.get(str(_norm(v)), np.nan)).astype(float)


class Subgroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    column: str
    labels: dict[str, str] | None = Field(None, description="value -> name, e.g. {0: female}")
    bins: list[float] | None = Field(None, description="edges for numeric columns (age bands)")


class TableSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    features: list[Feature]
    outcome: Outcome
    subgroups: dict[str, Subgroup] = Field(default_factory=dict)
    site_column: str | None = None
    patient_column: str | None = None
    population: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="intended population, column -> [low, high] inclusive; rows outside are "
        "refused (outside_intended_population), rows without the value too (population_unknown)",
    )

    @model_validator(mode="after")
    def _unique(self) -> TableSchema:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        if self.outcome.column in names:
            raise ValueError("the outcome column cannot also be a feature")
        for col in self.outcome.definition:
            if col in names:
                raise ValueError(
                    f"{col} defines the outcome {self.outcome.label!r} (reference standard): "
                    "reference-standard columns must never be features"
                )
        for col, (low, high) in self.population.items():
            if low > high:
                raise ValueError(f"population {col}: low > high")
        for key in (self.patient_column, self.site_column):
            if key is not None and key in names:
                raise ValueError(f"{key} identifies patients or sites: it cannot be a feature")
        return self

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]


@dataclass
class ValidatedTable:
    """Features (NaN = missing), the binary outcome, subgroup labels, and what was found."""

    X: pd.DataFrame
    y: np.ndarray
    groups: pd.DataFrame  # one column per subgroup (string labels)
    site: pd.Series | None
    patient: pd.Series | None
    rows_read: int
    rejected: dict[int, list[str]] = field(default_factory=dict)  # row number -> reasons
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # input row of each kept row
    problems: dict[tuple[str, str], int] = field(default_factory=dict)  # (column, reason) -> n
    codes: dict[int, str] = field(default_factory=dict)  # rejected row -> refusal code

    def refusals(self) -> dict[str, int]:
        """Rows refused per refusal code (codes with no rows left out)."""
        out: dict[str, int] = {}
        for code in self.codes.values():
            out[code] = out.get(code, 0) + 1
        return {c: out[c] for c in REFUSAL_CODES if c in out}

    def summary(self) -> str:
        lines = [
            f"rows read {self.rows_read:,}; kept {len(self.y):,}; rejected {len(self.rejected):,}"
        ]
        for (col, reason), n in sorted(self.problems.items()):
            lines.append(f"  {col}: {reason}: {n:,}")
        for code, n in self.refusals().items():
            lines.append(f"  refused {code}: {n:,}")
        return "\n".join(lines)


class SchemaError(ValueError):
    """The table cannot be read against the schema at all (for example a missing column)."""


def validate_records(
    df: pd.DataFrame, schema: TableSchema, *, require_outcome: bool = True
) -> ValidatedTable:
    """Check every row. Rows with an error (or a missing outcome) are rejected, with reasons."""
    duplicated = sorted(set(df.columns[df.columns.duplicated()]))
    if duplicated:
        raise SchemaError(f"the table has duplicated column names {duplicated}")
    needed = schema.feature_names + ([schema.outcome.column] if require_outcome else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise SchemaError(f"missing column(s) {missing}; the table has {list(df.columns)}")
    absent = [c for c in schema.population if c not in df.columns]
    if absent and require_outcome:  # training: a config error, not a property of the rows
        raise SchemaError(f"intended-population column(s) {absent} not in the table")
    df = df.reset_index(drop=True)
    rejected: dict[int, list[str]] = {}
    problems: dict[tuple[str, str], int] = {}
    codes: dict[int, str] = {}

    def note(
        col: str, reason: str, rows: np.ndarray, reject: bool, code: str = INVALID_VALUE
    ) -> None:
        if len(rows) == 0:
            return
        if reject:
            reason += " (row rejected)"
        problems[(col, reason)] = problems.get((col, reason), 0) + len(rows)
        if reject:
            for r in rows:
                rejected.setdefault(int(r), []).append(
                    f"{col}: {reason.removesuffix(' (row rejected)')}"
                )
                codes.setdefault(int(r), code)  # the first reason's code wins

    # The intended population first: its code wins over anything else wrong with the row.
    for col, (low, high) in schema.population.items():
        span = f"{low:g}..{high:g}"
        if col not in df.columns:  # scoring: no row can be placed in the population
            note(col, f"missing: needed for the intended population {span}",
                 np.arange(len(df)), True, POPULATION_UNKNOWN)  # fmt: skip
            continue
        value = pd.to_numeric(df[col], errors="coerce")
        value = value.where(np.isfinite(value.astype(float)))
        unknown = np.flatnonzero(value.isna())
        outside = np.flatnonzero(value.notna() & ((value < low) | (value > high)))
        note(col, f"missing: needed for the intended population {span}", unknown, True,
             POPULATION_UNKNOWN)  # fmt: skip
        note(col, f"outside the intended population {span}", outside, True, OUTSIDE_POPULATION)

    X = pd.DataFrame(index=df.index)
    for f in schema.features:
        raw = df[f.name]
        blank = raw.isna() | (raw.astype(str).str.strip() == "")
        marker = raw.isin(f.missing_values) | raw.astype(str).isin(
            [str(v) for v in f.missing_values]
        )
        note(f.name, "missing (blank)", np.flatnonzero(blank), False)
        note(f.name, "missing (marker value)", np.flatnonzero(marker & ~blank), False)
        if f.type == "numeric":
            values = pd.to_numeric(raw.where(~(blank | marker)), errors="coerce")
            values = values.where(np.isfinite(values.astype(float)) & (values.abs() < 3e38))
            bad = values.isna() & ~(blank | marker)
            note(f.name, "not a number", np.flatnonzero(bad), True)
            if f.range is not None:
                out = values.notna() & ((values < f.range[0]) | (values > f.range[1]))
                reason = f"outside {f.range[0]:g}..{f.range[1]:g}"
                if f.out_of_range == "missing":
                    note(f.name, reason + " (set missing)", np.flatnonzero(out), False)
                    values = values.where(~out)
                else:
                    note(f.name, reason, np.flatnonzero(out), True)
            X[f.name] = values.astype(float)
        else:
            yes_no = f.codes.mapping() if f.codes is not None else None
            allowed = set(yes_no) if yes_no else {str(_norm(c)) for c in f.categories or []}
            text = raw.map(lambda v: str(_norm(v)))  # str per value: dtype inference would undo it
            bad = ~(blank | marker) & ~text.isin(allowed)
            note(f.name, f"not one of {sorted(allowed)}", np.flatnonzero(bad), True)
            if yes_no is not None:  # raw yes/no codes (1/2) -> 1/0: the model sees only 0/1
                X[f.name] = text.where(~(blank | marker | bad)).map(yes_no).astype(float)
            elif f.type == "binary":
                X[f.name] = pd.to_numeric(text.where(~(blank | marker | bad)), errors="coerce")
            else:  # categories as strings; "" is missing (what the ONNX string input carries)
                X[f.name] = text.where(~(blank | marker | bad), "").astype(object)
    y = pd.Series(np.nan, index=df.index)
    if require_outcome:
        out_col = df[schema.outcome.column]
        raw_y = pd.to_numeric(out_col, errors="coerce")
        y = schema.outcome.apply(out_col)
        if schema.outcome.codes is not None:  # a value that is not a yes/no code is odd
            blank_y = out_col.isna() | (out_col.astype(str).str.strip() == "")
            odd = y.isna() & ~blank_y
            y_missing = blank_y
        else:
            # An outcome is a count or a class: 0/1 for == and != rules, else a non-negative
            # integer.
            binary_rule = any(op in schema.outcome.rule for op in ("==", "!="))
            odd = raw_y.notna() & ((raw_y < 0) | (raw_y % 1 != 0) | (binary_rule & (raw_y > 1)))
            y_missing = y.isna()
        note(schema.outcome.column, "outcome missing", np.flatnonzero(y_missing), True,
             OUTCOME_MISSING)  # fmt: skip
        note(schema.outcome.column, "outcome not an expected value", np.flatnonzero(odd), True,
             OUTCOME_MISSING)  # fmt: skip
    keep = np.array([i not in rejected for i in range(len(df))], dtype=bool)
    groups = pd.DataFrame(index=df.index)
    for name, g in schema.subgroups.items():
        if g.column not in df.columns:
            if not require_outcome:  # scoring: subgroups are for reports, not needed
                continue
            raise SchemaError(f"subgroup {name}: column {g.column!r} not in the table")
        col = df[g.column]
        if g.bins:
            labels = [f"{g.bins[i]:g}-{g.bins[i + 1]:g}" for i in range(len(g.bins) - 1)]
            groups[name] = pd.cut(
                pd.to_numeric(col, errors="coerce"), g.bins, labels=labels, right=False
            ).astype(str)
        elif g.labels:
            names = {str(_norm(k)): v for k, v in g.labels.items()}
            groups[name] = col.map(lambda v, names=names: names.get(str(_norm(v)), "unknown"))
        else:
            groups[name] = col.astype(str)

    def key(column: str | None) -> pd.Series | None:
        if column is None or column not in df.columns:
            if column is not None and require_outcome:
                raise SchemaError(f"column {column!r} (patient or site key) not in the table")
            return None
        values = df[column].astype(str)
        blank = df[column].isna() | (values.str.strip() == "")
        # a blank key is its own group, never one shared "nan" group
        return values.where(~blank, "__row" + df.index.astype(str))

    site = key(schema.site_column)
    if site is not None and "site" not in groups.columns:
        groups["site"] = site  # per-site metrics come with the other subgroups
    patient = key(schema.patient_column)
    return ValidatedTable(
        X=X[keep].reset_index(drop=True),
        y=y[keep].to_numpy(dtype=float),
        groups=groups[keep].reset_index(drop=True),
        site=site[keep].reset_index(drop=True) if site is not None else None,
        patient=patient[keep].reset_index(drop=True) if patient is not None else None,
        rows_read=len(df),
        rejected=rejected,
        problems=problems,
        rows=np.flatnonzero(keep),
        codes=codes,
    )


def _norm(value: Any) -> Any:
    """1.0 -> 1 so that '1', 1 and 1.0 name the same category."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            f = float(value)
            return int(f) if f.is_integer() else f
        except ValueError:
            return value.strip()
    return value


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"table not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    import csv

    with path.open(newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:  # pandas would rename them "age.1" and carry on
        raise SchemaError(f"{path}: duplicated column names {duplicated}")
    return pd.read_csv(path)
