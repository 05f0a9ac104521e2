"""The reviewer API: worklist, reviews, the report (FHIR or text), agreement and population
statistics. Reviews go through `review.record_reviews`, the code path the review page uses."""

from __future__ import annotations

import json
from typing import Any, cast

from fastapi import APIRouter, Query
from fastapi.responses import Response

from diagnostics.serve.api.deps import ConfigDep, PrincipalDep, StoreDep, need, visible_study
from diagnostics.serve.api.errors import Problem, json_response
from diagnostics.serve.monitor import daily
from diagnostics.serve.review import ReviewBody, ReviewError, record_reviews
from diagnostics.serve.store import MaxWait

router = APIRouter(tags=["reviews"])


@router.get("/v1/worklist")
def worklist(
    p: PrincipalDep, store: StoreDep, cfg: ConfigDep, limit: int = Query(100, ge=1, le=1000)
) -> Response:
    need(p, "reviewer", "admin")
    wait = MaxWait(cfg.triage.max_wait_minutes, dict(cfg.triage.clinics))
    items = store.worklist(p.visible(), limit=limit, max_wait=wait)
    store.log_access(p.key_id, "worklist.read", "worklist", p.key_id)
    return json_response({"studies": items})


@router.post("/v1/studies/{study_id}/reviews", status_code=201)
def review(study_id: str, body: ReviewBody, p: PrincipalDep, store: StoreDep) -> Response:
    need(p, "reviewer", "admin")
    study = visible_study(store, p, study_id)
    try:
        ids = record_reviews(store, study, p.key_id, body.reviews)
    except ReviewError as exc:
        raise Problem(exc.status, exc.code, exc.detail) from None
    return json_response({"reviews": ids, "study": study_id}, status=201)


@router.get("/v1/studies/{study_id}/report")
def report(
    study_id: str,
    p: PrincipalDep,
    store: StoreDep,
    lang: str = Query("en", pattern="^(en|vi)$"),
    format: str = Query("fhir", pattern="^(fhir|text)$"),
) -> Response:
    from diagnostics.serve.reports import fhir_report, shown_model, text_report

    study = visible_study(store, p, study_id)
    if study.status != "scored":
        raise Problem(409, "not_scored", f"The study is {study.status}; there is no report.")
    found = store.study_view(study_id)
    if found is None:  # not reached: studies are never deleted
        raise Problem(404, "study_not_found", "No such study.")
    view = cast(dict[str, Any], found)  # the report builders take a plain dict
    store.log_access(p.key_id, "report.read", "study", study_id, format=format, **shown_model(view))
    if format == "text":
        return Response(text_report(view, lang), media_type="text/plain; charset=utf-8")
    doc = fhir_report(view, lang, store.dicom_uids(study_id))
    return Response(json.dumps(doc, allow_nan=False), media_type="application/fhir+json")


@router.get("/v1/stats/agreement")
def agreement(p: PrincipalDep, store: StoreDep) -> Response:
    need(p, "reviewer", "admin")
    return json_response({"agreement": store.agreement(p.visible())})


@router.get("/v1/stats/population")
def population(p: PrincipalDep, store: StoreDep, cfg: ConfigDep) -> Response:
    """Per site and day: refused or flagged outside the population or distribution, and
    the share called positive, with the alert level from serve.yaml."""
    need(p, "reviewer", "admin")
    return json_response(
        {
            "alert_share": cfg.monitor.alert_share,
            "min_studies": cfg.monitor.min_studies,
            "days": daily(store, p.visible(), cfg.monitor),
        }
    )
