"""The risk worklist: clinical records a risk model scored (or refused) at the clinic, the
confirmed outcome clinicians record for each, and agreement and calibration per site.

A reviewer sees the records of their clinics, an admin all. Records awaiting an outcome come
first (high risk before low), then the rest, newest first. Each row shows the values sent (the
features and population columns of the record as stored: never its patient or site column,
which identify; a model no longer served shows none, its schema being unknown) and the notes
made reading a FHIR Bundle (what was left out, and why). The outcome form posts to
`/review/risk/{id}/outcome` (CSRF checked, audited by `Store.add_risk_outcome`); a refused
record was never scored and takes no outcome (409).
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from diagnostics.serve.api.deps import StoreDep
from diagnostics.serve.api.risk import OUTCOMES, risk_models
from diagnostics.serve.config import RISK_NAME
from diagnostics.serve.i18n import risk_code, risk_label, risk_note, t
from diagnostics.serve.risk_outcomes import MIN_FOR_CALIBRATION, site_agreement
from diagnostics.serve.web.common import WebDenied, form_checked, lang_of, render, user, visible

router = APIRouter(prefix="/review")

LIMIT = 200  # records per part of the list (awaiting an outcome, the rest)
NOTE_MAX = 2000  # as the API's outcome note
STATUSES = ("scored", "refused")
FILTERS = ("model", "status", "awaiting", "clinic")


def _filters(model: str, status: str, awaiting: str, clinic: str) -> dict[str, str]:
    """The list's filters, cleaned: only known values travel on (into links and redirects)."""
    return {
        "model": model if RISK_NAME.fullmatch(model) else "",
        "status": status if status in STATUSES else "",
        "awaiting": "1" if awaiting in ("1", "on", "true") else "",
        "clinic": clinic[:64],
    }


def _query(filters: dict[str, str], **extra: str) -> str:
    q = {k: v for k, v in {**filters, **extra}.items() if v}
    return "?" + urlencode(q) if q else ""


def _awaiting(r: dict[str, Any]) -> bool:
    return r["status"] == "scored" and r["outcome"] is None


def _records(store: Any, scope: list[str] | None, f: dict[str, str]) -> tuple[list[Any], bool]:
    """Awaiting an outcome first (high before low, then newest), then the rest, newest first;
    and whether a part was cut at LIMIT."""
    common = {
        "model": f["model"] or None,
        "status": f["status"] or None,
        "clinic": f["clinic"] or None,
        "limit": LIMIT,
    }
    waiting = []
    if f["status"] != "refused":
        waiting = store.list_risk_records(scope, awaiting_outcome=True, **common)
    rest = [] if f["awaiting"] else store.list_risk_records(scope, **common)
    cut = len(waiting) == LIMIT or len(rest) == LIMIT
    rest = [r for r in rest if not _awaiting(r)]
    # the store sorts newest first; a stable sort keeps that within high and low
    waiting.sort(key=lambda r: r["category"] != "high")
    return waiting + rest, cut


def _visible_record(store: Any, scope: list[str] | None, record_id: str) -> Any:
    """The record's view if the reviewer may see it; None otherwise (or if there is none)."""
    view = store.risk_view(record_id[:64])
    return None if view is None or (scope is not None and view["clinic"] not in scope) else view


def _fixed(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _who(actor: str) -> str:
    return actor.removeprefix("user:")


VALUE_MAX = 40  # characters of a value as sent shown in the list


def _value_text(v: Any) -> str:
    """A value as sent, for the list: 8.0 -> "8", 3.2 -> "3.2", text as is (cut short)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    text = str(v)
    return text if len(text) <= VALUE_MAX else text[: VALUE_MAX - 1] + "…"


def _sent(store: Any, served: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    """What a row shows of its record as sent: `values`, [(column, value)] of the features and
    population columns the model reads (the patient and site columns never: they identify), or
    None with `why` (`not_served`: the model's schema is not known here, so nothing is shown;
    `unreadable`); and `notes`, what reading a FHIR Bundle left out, and why."""
    try:
        doc = store.risk_document(r["id"])
    except (KeyError, OSError, ValueError):
        return {"values": None, "why": "unreadable", "notes": []}
    doc = doc if isinstance(doc, dict) else {}
    notes = doc.get("notes")
    notes = (
        [n for n in notes if isinstance(n, str) and n.strip()] if isinstance(notes, list) else []
    )
    record = doc.get("record")
    model = served.get(r["model"])
    if model is None:
        return {"values": None, "why": "not_served", "notes": notes}
    if not isinstance(record, dict):
        return {"values": None, "why": "unreadable", "notes": notes}
    schema = model.schema
    hidden = {c for c in (schema.patient_column, schema.site_column) if c}
    columns = dict.fromkeys([*schema.population, *schema.feature_names])
    values = [
        (c, _value_text(record[c]))
        for c in columns
        if c not in hidden and record.get(c) is not None and record.get(c) != ""
    ]
    return {"values": values, "why": None, "notes": notes}


@router.get("/risk", response_class=HTMLResponse)
def risk_page(
    request: Request,
    store: StoreDep,
    model: str = "",
    status: str = "",
    awaiting: str = "",
    clinic: str = "",
    saved: str = "",
) -> HTMLResponse:
    row = user(request, store)
    scope = visible(row)
    f = _filters(model, status, awaiting, clinic)
    records, cut = _records(store, scope, f)
    served = risk_models(request)
    sent = {r["id"]: _sent(store, served, r) for r in records}  # one document read per row
    sites = site_agreement(store.risk_outcome_pairs(scope))
    clinics = scope if scope is not None else store.clinics()
    models = sorted(
        {*served, *(r["model"] for r in records), *(s["model"] for s in sites)}
        | ({f["model"]} if f["model"] else set())
    )
    store.log_access(
        f"user:{row.username}",
        "risk.worklist.read",
        "worklist",
        row.username,
        records=len(records),
        **{k: v for k, v in f.items() if v},
    )
    lang = lang_of(request)
    return render(
        request,
        "risk.html",
        records=records,
        sent=sent,
        cut=cut,
        limit=LIMIT,
        sites=sites,
        min_outcomes=MIN_FOR_CALIBRATION,
        clinics=clinics,
        models=models,
        statuses=STATUSES,
        filters=f,
        saved=_visible_record(store, scope, saved) is not None if saved else False,
        awaiting_outcome=_awaiting,
        pct=_pct,
        fixed=_fixed,
        who=_who,
        code_text=lambda code: risk_code(lang, code),
        label_text=lambda label: risk_label(lang, label),
        note_text=lambda note: risk_note(lang, note),
        outcome_keys=list(OUTCOMES),
        outcome_key={v: k for k, v in OUTCOMES.items()},
        note_max=NOTE_MAX,
    )


@router.post("/risk/{record_id}/outcome")
async def record_outcome(request: Request, record_id: str, store: StoreDep) -> Response:
    form = await form_checked(request)
    row = user(request, store)
    view = _visible_record(store, visible(row), record_id)
    if view is None:
        raise WebDenied(404, lang_of(request))  # the same answer whether or not it exists
    if view["status"] != "scored":
        lang = lang_of(request)
        return render(
            request, "message.html", status=409, message=t(lang, "risk_refused_no_outcome")
        )
    choice = str(form.get("outcome", ""))
    if choice not in OUTCOMES:
        raise WebDenied(400, lang_of(request))
    note = str(form.get("note", "")).replace("\x00", "").strip()[:NOTE_MAX]
    store.add_risk_outcome(record_id, f"user:{row.username}", OUTCOMES[choice], note)
    f = _filters(*(str(form.get(k, "")) for k in FILTERS))
    target = "/review/risk" + _query(f, saved=record_id) + f"#risk-{record_id}"
    return RedirectResponse(target, status_code=303)
