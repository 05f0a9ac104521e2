"""The clinic API: upload a study, read its result, list studies, fetch a heatmap.

A study is answered 202 only after its blob is fsynced and renamed and its row committed. A
clinic's identity comes from its API key, never from the request; another clinic's study
answers 404. Every refused upload is audited and counted by its code.

GET /v1/studies/{id}?wait=S is a long-poll: it answers once the study is final (scored,
failed_qc, failed) or after S seconds (at most `MAX_WAIT_S`), whichever comes first, with the
same body as without `wait`. A client waits with one request per study instead of polling.
The wait holds no thread: it is woken by the in-process worker when it stores the study's
outcome, and re-reads the study's status every `RECHECK_S` for a worker in another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from diagnostics.serve.api.admission import RateLimiter, accept, admit, max_upload_bytes
from diagnostics.serve.api.deps import (
    ConfigDep,
    DataDirDep,
    LimiterDep,
    MetricsDep,
    Principal,
    PrincipalDep,
    StoreDep,
    WorkerDep,
    need,
    visible_study,
)
from diagnostics.serve.api.errors import Problem, json_response
from diagnostics.serve.config import ServeConfig
from diagnostics.serve.server import RequestTimedOut
from diagnostics.serve.store import FINAL, STATUSES, Store, study_summary
from diagnostics.serve.upload import UploadError, receive_file

router = APIRouter(tags=["studies"])


@router.post("/v1/studies", status_code=202)
async def upload(
    request: Request,
    p: PrincipalDep,
    cfg: ConfigDep,
    store: StoreDep,
    limiter: LimiterDep,
    metrics: MetricsDep,
    worker: WorkerDep,
    complete: bool = Query(
        True,
        description="false: keep the study open for more images (POST .../instances), scored "
        "when marked complete or after the quiet period",
    ),
) -> Response:
    """One file: a study of one image, scored at once (or kept open with complete=false)."""
    return await _upload(request, p, cfg, store, limiter, metrics, worker, None, complete)


@router.post("/v1/studies/{study_id}/instances", status_code=202)
async def add_image(
    study_id: str,
    request: Request,
    p: PrincipalDep,
    cfg: ConfigDep,
    store: StoreDep,
    limiter: LimiterDep,
    metrics: MetricsDep,
    worker: WorkerDep,
    complete: bool = Query(False, description="true: this is the study's last image"),
) -> Response:
    """Another image of an open study of this clinic (409 study_closed once it is scored)."""
    return await _upload(request, p, cfg, store, limiter, metrics, worker, study_id, complete)


@router.post("/v1/studies/{study_id}/complete", status_code=202)
def complete_study(
    study_id: str, p: PrincipalDep, cfg: ConfigDep, store: StoreDep, worker: WorkerDep
) -> Response:
    """Score an open study now, without waiting for its quiet period."""
    if p.role != "submitter" and not (p.role == "admin" and not cfg.auth):
        need(p, "submitter")
    visible_study(store, p, study_id)
    study = store.complete_study(study_id, p.key_id)
    worker.wake.set()
    return JSONResponse(study_summary(study), status_code=202)


async def _upload(
    request: Request,
    p: Principal,
    cfg: ServeConfig,
    store: Store,
    limiter: RateLimiter,
    metrics: Any,
    worker: Any,
    study_id: str | None,
    complete: bool,
) -> Response:
    if p.role != "submitter" and not (p.role == "admin" and not cfg.auth):
        need(p, "submitter")
    if study_id is not None:
        visible_study(store, p, study_id)
    t0 = time.perf_counter()
    try:
        study, created = await receive_study(
            request, p, cfg, store, limiter, study_id=study_id, complete=complete
        )
    except Problem as exc:  # every refused upload is audited and counted, by code
        metrics.refusals.labels(exc.code).inc()
        await run_in_threadpool(store.log_access, p.key_id, "upload.refused", "upload", exc.code)
        raise
    if created:
        worker.wake.set()
        metrics.ack.observe(time.perf_counter() - t0)
    else:
        await run_in_threadpool(store.log_access, p.key_id, "study.duplicate", "study", study.id)
    location = f"/v1/studies/{study.id}"
    body = {**study_summary(study), "location": location, "duplicate": not created}
    return JSONResponse(body, status_code=202, headers={"Location": location})


async def receive_study(
    request: Request,
    p: Principal,
    cfg: ServeConfig,
    store: Store,
    limiter: RateLimiter,
    *,
    study_id: str | None = None,
    complete: bool | None = True,
) -> tuple[Any, bool]:
    """Admit, stream the body to a temp file, make it a study: (study, created)."""
    clinic = p.clinic or "dev"
    idem = request.headers.get("idempotency-key", "").strip() or None
    if idem is not None and len(idem) > 128:
        raise Problem(400, "bad_idempotency_key", "Idempotency-Key is over 128 characters.")
    length = request.headers.get("content-length")
    await run_in_threadpool(admit, cfg, store, limiter, clinic, idem, length)
    temp = store.blobs.temp_file()
    try:
        try:
            got = await receive_file(
                request.headers.get("content-type", ""),
                request.stream(),
                temp,
                max_bytes=max_upload_bytes(cfg),
            )
        except UploadError as exc:
            raise Problem(exc.status, exc.code, exc.message) from None
        except ClientDisconnect:
            raise Problem(400, "client_disconnected", "The upload was interrupted.") from None
        except RequestTimedOut as exc:
            close = {"Connection": "close"}
            raise Problem(408, "request_timeout", exc.message, close) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise Problem(507, "insufficient_storage", "The service ran out of disk.") from None
            raise
        return await run_in_threadpool(
            accept, cfg, store, clinic, p.key_id, idem, got, study_id=study_id, complete=complete
        )
    finally:
        temp.unlink(missing_ok=True)


MAX_WAIT_S = 30.0  # the longest a long-poll is held
RECHECK_S = 1.0  # a long-poll re-reads the status this often (a worker in another process)


@router.get("/v1/studies/{study_id}")
async def get_study(
    study_id: str,
    p: PrincipalDep,
    store: StoreDep,
    worker: WorkerDep,
    wait: float = Query(
        0.0,
        ge=0.0,
        le=MAX_WAIT_S,
        description="seconds to wait for the study to be final before answering (long-poll)",
    ),
) -> Response:
    if wait > 0:
        await _wait_final(study_id, p, store, worker, wait)
    return await run_in_threadpool(_read_study, study_id, p, store)


def _read_study(study_id: str, p: Principal, store: Store) -> Response:
    visible_study(store, p, study_id)
    view = store.study_view(study_id)
    store.log_access(p.key_id, "study.read", "study", study_id)
    return json_response(view)


async def _wait_final(study_id: str, p: Principal, store: Store, worker: Any, wait: float) -> None:
    """Return once `study_id` is final, or after `wait` seconds. 404 (as the read itself
    would) for a study the caller may not see, before any waiting."""
    deadline = time.monotonic() + wait
    watch = getattr(worker, "watch", None)
    event = watch(study_id) if watch is not None else asyncio.Event()
    try:
        study = await run_in_threadpool(visible_study, store, p, study_id)
        while study.status not in FINAL:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):  # a re-read, for a worker elsewhere
                await asyncio.wait_for(event.wait(), timeout=min(left, RECHECK_S))
            event.clear()
            got = await run_in_threadpool(store.get_study, study_id)
            if got is None:
                return
            study = got
    finally:
        unwatch = getattr(worker, "unwatch", None)
        if unwatch is not None:
            unwatch(study_id, event)


@router.get("/v1/studies")
def list_studies(
    p: PrincipalDep,
    store: StoreDep,
    status: str | None = Query(None),
    since: datetime | None = Query(None, description="ISO 8601"),
    limit: int = Query(100, ge=1, le=1000),
) -> Response:
    if status is not None and status not in STATUSES:
        raise Problem(422, "invalid_status", f"status is one of {', '.join(STATUSES)}.")
    if since is not None:  # SQLite compares stored UTC text: convert, whatever the offset
        try:
            since = since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC)
        except OverflowError:  # 9999-12-31T23:59-23:59 lies past the last datetime in UTC
            raise Problem(422, "invalid_request", "since: outside the range of dates") from None
    rows = store.list_studies(p.visible(), status=status, since=since, limit=limit)
    store.log_access(p.key_id, "study.list", "clinic", p.clinic or p.role)
    return json_response({"studies": [study_summary(s) for s in rows]})


@router.get("/v1/studies/{study_id}/heatmaps/{label}")
def heatmap(
    study_id: str, label: str, p: PrincipalDep, store: StoreDep, data_dir: DataDirDep
) -> Response:
    visible_study(store, p, study_id)
    view = store.study_view(study_id)
    for f in view["findings"] if view is not None else []:
        if f["label"] == label and f["heatmap"]:
            path = data_dir / "heatmaps" / f["heatmap"]
            if path.is_file():
                store.log_access(p.key_id, "heatmap.read", "study", study_id)
                return FileResponse(path, media_type="image/png")
    raise Problem(404, "heatmap_not_found", "No heatmap for that finding.")
