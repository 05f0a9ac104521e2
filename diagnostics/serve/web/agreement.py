"""Agreement between reviewers and the model, and the population monitor (admins only)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from diagnostics.serve.api.deps import ConfigDep, StoreDep
from diagnostics.serve.monitor import daily
from diagnostics.serve.web.common import WebDenied, lang_of, render, user

router = APIRouter(prefix="/review")


@router.get("/agreement", response_class=HTMLResponse)
def agreement_page(request: Request, cfg: ConfigDep, store: StoreDep) -> HTMLResponse:
    row = user(request, store)
    if row.role != "admin":
        raise WebDenied(403, lang_of(request))
    return render(
        request,
        "agreement.html",
        rows=store.agreement(None),
        monitor=daily(store, None, cfg.monitor),
        level=f"{100 * cfg.monitor.alert_share:.0f}%",
        min_studies=cfg.monitor.min_studies,
    )
