"""Risk at the clinic: clinical records scored by a risk model, reviewed, and sent to the HIS.

- `POST /v1/risk/{model}`: JSON records (`{"records": [{...}, ...]}`, a list, or one record),
  or a FHIR R4 Bundle of a Patient and Observations (`application/fhir+json`). Each record is
  validated by the schema inside the model file, stored (the record as sent is a blob, fsynced
  before its row commits), scored with the ONNX model (and the site's recalibration, if it has
  one) or refused with a code, and answered only once committed. A FHIR request is answered
  with a `RiskAssessment` (201), or an `OperationOutcome` (422) when the record was refused; a
  JSON request with the records (201), or a FHIR Bundle of them when it asks
  (`Accept: application/fhir+json`).
- `GET /v1/risk/records[/{id}]`: the records a caller may see; `?format=fhir` for FHIR.
- `POST /v1/risk/records/{id}/outcome`: a clinician records the confirmed outcome later.
- `GET /v1/risk/agreement`: agreement and calibration per site, from those outcomes.
- `GET /v1/risk/models`: the risk models served, and the fields each expects.

Same keys, roles, audit and problem+json answers as the image API; a clinic sees only its own
records. Records are never logged; logs and audit rows carry generated record IDs and codes.
"""

from __future__ import annotations

import errno
import json
import math
import time
from datetime import UTC, datetime
from typing import Any, Literal

import pandas as pd
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from diagnostics.serve.api.admission import RateLimiter, check_disk, check_rate
from diagnostics.serve.api.deps import (
    ConfigDep,
    LimiterDep,
    MetricsDep,
    Principal,
    PrincipalDep,
    StoreDep,
    need,
)
from diagnostics.serve.api.errors import Problem, json_response
from diagnostics.serve.config import ServeConfig
from diagnostics.serve.store import Store
from diagnostics.serve.store.risk import KeyReused

router = APIRouter(tags=["risk"])

FHIR_JSON = "application/fhir+json"
OUTCOMES = {"confirmed": True, "ruled_out": False, "unknown": None}


def risk_models(request: Request) -> dict[str, Any]:
    models: dict[str, Any] = getattr(request.app.state, "risk_models", None) or {}
    return models


def _model(request: Request, name: str) -> Any:
    model = risk_models(request).get(name)
    if model is None:
        raise Problem(404, "risk_model_not_found", f"No risk model named {name!r} is served here.")
    return model


def _submitter(p: Principal, cfg: ServeConfig) -> None:
    if p.role != "submitter" and not (p.role == "admin" and not cfg.auth):
        need(p, "submitter")


# --------------------------------------------------------------------------- records in


def _json_records(body: Any, model: Any) -> list[dict[str, Any]]:
    """The records of a JSON body, each a flat object of the fields the schema knows."""
    if isinstance(body, dict) and "records" in body:
        body = body["records"]
        if not isinstance(body, list):
            raise Problem(422, "invalid_record", "records is not a list of records.")
    records = body if isinstance(body, list) else [body]
    if not records:
        raise Problem(422, "no_records", "The request holds no record.")
    schema = model.schema
    known = set(schema.feature_names) | set(schema.population)
    known |= {c for c in (schema.patient_column, schema.site_column) if c}
    binary = {f.name: f for f in schema.features if f.type == "binary"}
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not rec:
            raise Problem(422, "invalid_record", f"Record {i} is not a non-empty JSON object.")
        unknown = sorted(set(rec) - known)
        if unknown:
            raise Problem(
                422,
                "unknown_field",
                f"Record {i}: {', '.join(unknown)} not known to this model (it reads "
                f"{', '.join(sorted(known))}).",
            )
        clean = {}
        for key, value in rec.items():
            if isinstance(value, bool):
                # yes/no as a JSON boolean: the feature's own code (1/2 in the OUCRU file)
                if key not in binary:
                    raise Problem(422, "invalid_record", f"Record {i}: {key} is not a yes/no.")
                codes = binary[key].codes
                value = (codes.yes if value else codes.no) if codes else int(value)
            elif value is not None and not isinstance(value, str | int | float):
                raise Problem(422, "invalid_record", f"Record {i}: {key} is not a plain value.")
            elif isinstance(value, int | float) and not abs(value) < 1e15:
                raise Problem(422, "invalid_record", f"Record {i}: {key} is out of any range.")
            elif isinstance(value, str) and len(value) > 200:
                raise Problem(422, "invalid_record", f"Record {i}: {key} is over 200 characters.")
            clean[key] = value
        out.append(clean)
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python reads them, JSON has none


def _fhir_record(body: Any, model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(record, document) from a FHIR Bundle; 422 `invalid_fhir` when it cannot be read."""
    from diagnostics.serve.risk_fhir import FhirInputError, records_from_bundle

    try:
        got = records_from_bundle(body, model.schema)
    except FhirInputError as exc:
        raise Problem(422, "invalid_fhir", str(exc)) from None
    doc = {
        "source": "fhir",
        "record": got.record,
        "subject": got.subject,
        "basis": got.basis,
        "notes": got.notes,
    }  # what the record was made of; the rest of the Bundle (names, addresses) is not kept
    return got.record, doc


def _json_document(record: dict[str, Any], model: Any) -> dict[str, Any]:
    patient = model.schema.patient_column
    subject = None
    if patient and record.get(patient) not in (None, ""):
        subject = {"type": "Patient", "identifier": {"value": str(record[patient])}}
    return {"source": "json", "record": record, "subject": subject, "basis": [], "notes": []}


def _score(
    model: Any, name: str, records: list[dict[str, Any]], profile: Any
) -> list[dict[str, Any]]:
    """One store item per record: scored or refused, with what the model made of it."""
    frame = pd.DataFrame(records, index=range(len(records)))
    for col in model.schema.feature_names:  # a field nobody sent is missing, not an error
        if col not in frame.columns:
            frame[col] = None
    scored = model.score(frame, profile=profile)
    items = []
    for row in scored.to_dict("records"):
        ok = row["status"] == "scored"
        items.append(
            {
                "model": name,
                "label": model.label,
                "status": "scored" if ok else "refused",
                "probability": float(row["risk"]) if ok else None,
                "raw_probability": float(row.get("raw_risk", row["risk"])) if ok else None,
                "category": row["category"] if ok else None,
                "threshold": float(row["threshold"]),
                "imputed": [c for c in str(row["imputed"]).split(", ") if c] if ok else [],
                "code": None if ok else (row["code"] or "invalid_value"),
                "reasons": [] if ok else [r for r in str(row["reasons"]).split("; ") if r],
                "model_name": model.metadata.name,
                "model_sha256": model.sha256,
                "model_version": model.version,
                "profile_id": _int_or_none(row.get("profile_id")) if ok else None,
            }
        )
    return items


def _int_or_none(v: Any) -> int | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return int(v)


@router.post("/v1/risk/{model}", status_code=201)
async def score_records(
    model: str,
    request: Request,
    p: PrincipalDep,
    cfg: ConfigDep,
    store: StoreDep,
    metrics: MetricsDep,
    limiter: LimiterDep,
) -> Response:
    """Score clinical records (JSON, or a FHIR Bundle) with a served risk model."""
    _submitter(p, cfg)
    t0 = time.perf_counter()
    try:
        risk_model = _model(request, model)
        fhir_in, body = await _read_body(request)
        idem = request.headers.get("idempotency-key", "").strip() or None
        if idem is not None and len(idem) > 128:
            raise Problem(400, "bad_idempotency_key", "Idempotency-Key is over 128 characters.")
        if fhir_in:
            record, doc = _fhir_record(body, risk_model)
            records, docs = [record], [doc]
        else:
            records = _json_records(body, risk_model)
            if len(records) > cfg.risk.max_records:
                raise Problem(
                    413,
                    "too_many_records",
                    f"{len(records)} records; at most {cfg.risk.max_records} per request.",
                )
            docs = [_json_document(r, risk_model) for r in records]
        clinic = p.clinic or "dev"
        await run_in_threadpool(_admit, cfg, store, limiter, clinic)
        stored = await run_in_threadpool(
            _score_and_store, store, risk_model, model, clinic, p.key_id, records, docs, idem
        )
    except Problem as exc:  # every refused request is audited and counted, by code
        metrics.refusals.labels(exc.code).inc()
        await run_in_threadpool(
            store.log_access, p.key_id, "risk.request_refused", "risk", exc.code
        )
        raise
    metrics.ack.observe(time.perf_counter() - t0)
    want_fhir = fhir_in or FHIR_JSON in request.headers.get("accept", "")
    if fhir_in:
        view, created = stored[0]
        return _fhir_answer(store, view, created)
    if want_fhir:
        from diagnostics.serve.risk_fhir import response_bundle

        bundle = response_bundle([_fhir_view(store, v) for v, _ in stored])
        return Response(json.dumps(bundle, allow_nan=False), 201, media_type=FHIR_JSON)
    out = [
        {**v, "location": f"/v1/risk/records/{v['id']}", "duplicate": not created}
        for v, created in stored
    ]
    answer = json_response({"records": out}, status=201 if any(c for _, c in stored) else 200)
    if len(out) == 1:
        answer.headers["Location"] = out[0]["location"]
    return answer


async def _read_body(request: Request) -> tuple[bool, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", FHIR_JSON):
        raise Problem(
            415,
            "unsupported_media_type",
            f"Send application/json records or an {FHIR_JSON} Bundle.",
        )
    raw = await request.body()
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError):
        raise Problem(400, "invalid_json", "The body is not valid JSON.") from None
    fhir = ctype == FHIR_JSON or (isinstance(body, dict) and body.get("resourceType") == "Bundle")
    return fhir, body


def _admit(cfg: ServeConfig, store: Store, limiter: RateLimiter, clinic: str) -> None:
    """The image API's refusals that apply here: low disk (507) and the clinic's rate (429:
    a request of records counts as one upload)."""
    check_disk(cfg, store)
    check_rate(cfg, limiter, clinic)


def _score_and_store(
    store: Store,
    model: Any,
    name: str,
    clinic: str,
    actor: str,
    records: list[dict[str, Any]],
    docs: list[dict[str, Any]],
    idem: str | None,
) -> list[tuple[Any, bool]]:
    profile = store.site_profile(model.sha256, clinic)
    items = _score(model, name, records, profile)
    for i, (item, doc) in enumerate(zip(items, docs, strict=True)):
        item["document"] = doc
        item["source"] = doc["source"]
        item["idempotency_key"] = None if idem is None else f"{idem}#{i}"
    try:
        return store.add_risk_records(clinic, actor, items)
    except KeyReused:
        raise Problem(
            409,
            "idempotency_key_reused",
            "This Idempotency-Key was used before for another record or model.",
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise Problem(507, "insufficient_storage", "The service ran out of disk.") from None
        raise


def _fhir_view(store: Store, view: Any) -> dict[str, Any]:
    doc = store.risk_document(view["id"])
    return {
        **view,
        "subject": doc.get("subject"),
        "basis": doc.get("basis") or [],
        "notes": doc.get("notes") or [],  # Observations left out, and why
    }


def _fhir_answer(store: Store, view: Any, created: bool) -> Response:
    from diagnostics.serve.risk_fhir import operation_outcome, risk_assessment

    full = _fhir_view(store, view)
    location = {"Location": f"/v1/risk/records/{view['id']}"}
    if view["status"] == "scored":
        doc, status = risk_assessment(full), (201 if created else 200)
    else:
        doc, status = operation_outcome(full), 422
    return Response(
        json.dumps(doc, allow_nan=False), status, headers=location, media_type=FHIR_JSON
    )


# --------------------------------------------------------------------------- records out


def visible_record(store: Store, p: Principal, record_id: str) -> Any:
    """The record's view, if the caller may see it; 404 otherwise, whether or not it exists."""
    view = store.risk_view(record_id)
    if view is None or not p.can_see(view["clinic"]):
        raise Problem(404, "risk_record_not_found", "No such risk record.")
    return view


@router.get("/v1/risk/records")
def list_records(
    p: PrincipalDep,
    store: StoreDep,
    model: str | None = Query(None),
    status: Literal["scored", "refused"] | None = Query(None),
    awaiting_outcome: bool = Query(False),
    since: datetime | None = Query(None, description="ISO 8601"),
    limit: int = Query(100, ge=1, le=1000),
) -> Response:
    if since is not None:  # stored UTC: convert, whatever the offset
        try:
            since = since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC)
        except OverflowError:
            raise Problem(422, "invalid_request", "since: outside the range of dates") from None
    rows = store.list_risk_records(
        p.visible(),
        model=model,
        status=status,
        awaiting_outcome=awaiting_outcome,
        since=since,
        limit=limit,
    )
    store.log_access(p.key_id, "risk.list", "clinic", p.clinic or p.role)
    return json_response({"records": rows})


@router.get("/v1/risk/records/{record_id}")
def get_record(
    record_id: str,
    request: Request,
    p: PrincipalDep,
    store: StoreDep,
    format: Literal["json", "fhir"] | None = Query(None),
) -> Response:
    view = visible_record(store, p, record_id)
    store.log_access(p.key_id, "risk.read", "risk", record_id)
    if format == "fhir" or (format is None and FHIR_JSON in request.headers.get("accept", "")):
        from diagnostics.serve.risk_fhir import operation_outcome, risk_assessment

        full = _fhir_view(store, view)
        doc = risk_assessment(full) if view["status"] == "scored" else operation_outcome(full)
        return Response(json.dumps(doc, allow_nan=False), media_type=FHIR_JSON)
    return json_response(view)


class OutcomeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome: Literal["confirmed", "ruled_out", "unknown"] = Field(
        description="confirmed: the laboratory confirmed the outcome; ruled_out: it did not"
    )
    note: str = Field("", max_length=2000)

    @field_validator("note")
    @classmethod
    def _printable(cls, v: str) -> str:
        return v.replace("\x00", "")  # PostgreSQL text holds no NUL


@router.post("/v1/risk/records/{record_id}/outcome", status_code=201)
def record_outcome(record_id: str, body: OutcomeIn, p: PrincipalDep, store: StoreDep) -> Response:
    """The confirmed outcome of a record (reviewers of its clinic, admins)."""
    need(p, "reviewer", "admin")
    view = visible_record(store, p, record_id)
    if view["status"] != "scored":
        raise Problem(409, "record_refused", "A refused record was never scored.")
    store.add_risk_outcome(record_id, p.key_id, OUTCOMES[body.outcome], body.note)
    return json_response(store.risk_view(record_id), status=201)


@router.get("/v1/risk/agreement")
def agreement(p: PrincipalDep, store: StoreDep, model: str | None = Query(None)) -> Response:
    """Per site and model: agreement of the category with the recorded outcomes, sensitivity,
    specificity, AUROC and calibration (intercept, slope)."""
    from diagnostics.serve.risk_outcomes import site_agreement

    need(p, "reviewer", "admin")
    rows = site_agreement(store.risk_outcome_pairs(p.visible(), model))
    store.log_access(p.key_id, "risk.agreement", "clinic", p.clinic or p.role)
    return json_response({"sites": rows})


@router.get("/v1/risk/models")
def list_models(request: Request, p: PrincipalDep) -> Response:
    """The risk models served: name, outcome, threshold, the fields a record may hold."""
    out = []
    for name, m in risk_models(request).items():
        schema = m.schema
        out.append(
            {
                "name": name,
                "model_name": m.metadata.name,
                "model_sha256": m.sha256,
                "model_version": m.version,
                "label": m.label,
                "threshold": m.threshold,
                "population": {k: list(v) for k, v in schema.population.items()},
                "features": [
                    {"name": f.name, "type": f.type, "unit": f.unit, "description": f.description}
                    for f in schema.features
                ],
            }
        )
    return json_response({"models": out})
