"""The worklist: the studies a reviewer may see, filtered, sorted (triage first) and paged."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from diagnostics.serve.api.deps import ConfigDep, HolderDep, StoreDep
from diagnostics.serve.store import STATUSES, MaxWait
from diagnostics.serve.web.common import PER_PAGE, render, user, visible

router = APIRouter(prefix="/review")


@router.get("/", response_class=HTMLResponse)
def worklist(
    request: Request,
    cfg: ConfigDep,
    store: StoreDep,
    holder: HolderDep,
    clinic: str = "",
    status: str = "",
    finding: str = "",
    sort: str = "triage",
    page: int = 1,
) -> HTMLResponse:
    row = user(request, store)
    page = min(max(1, page), 100_000)
    items, total = store.browse(
        visible(row),
        clinic=clinic or None,
        status=status if status in STATUSES else None,
        finding=finding or None,
        sort=sort,
        page=page,
        per_page=PER_PAGE,
        max_wait=MaxWait(cfg.triage.max_wait_minutes, dict(cfg.triage.clinics)),
    )
    pages = max(1, -(-total // PER_PAGE))
    clinics = visible(row) if row.role != "admin" else store.clinics()
    query = {"clinic": clinic, "status": status, "finding": finding, "sort": sort}
    store.log_access(f"user:{row.username}", "worklist.read", "worklist", row.username)
    return render(
        request,
        "worklist.html",
        items=items,
        total=total,
        page=page,
        pages=pages,
        clinics=clinics,
        statuses=STATUSES,
        findings=holder.model.labels,
        filters=query,
        page_url=lambda n: "/review/?" + urlencode({**query, "page": n}),
        admin=row.role == "admin",
        # sites that read before the AI: no AI flags on their worklist rows
        blind=set(cfg.review.independent_impression_clinics),
    )
