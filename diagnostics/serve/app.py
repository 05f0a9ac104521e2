"""The clinic service: FastAPI app for clinics (upload, results), reviewers (worklist, reviews),
health and metrics. Torch-free; started by `diagnostics serve`.

Every error is RFC 7807 `application/problem+json` with a stable `code`. A study is answered
202 only after its blob is fsynced and renamed and its row committed. A clinic's identity comes
from its API key, never from the request; another clinic's study answers 404.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import defaultdict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from diagnostics.serve import qc
from diagnostics.serve.config import MonitorSection, ServeConfig
from diagnostics.serve.models import ModelHolder, ModelSource
from diagnostics.serve.monitor import AlertLog, daily
from diagnostics.serve.review import ReviewBody, ReviewError, record_reviews
from diagnostics.serve.runner import OnnxModel, ScoreResult
from diagnostics.serve.server import BodyTimeout, RequestTimedOut
from diagnostics.serve.store import Conflict, Store, StoreBusy, StoreFull, study_summary
from diagnostics.serve.upload import BODY_OVERHEAD, UploadError, receive_file
from diagnostics.serve.worker import Worker, start_thread

log = logging.getLogger("diagnostics.serve")

PROBLEM = "application/problem+json"

# Sent with every response. The review pages use no inline script or style, so the policy can
# be strict; they are never framed (clickjacking) and types are never sniffed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Problem(Exception):
    """An error answered as problem+json: HTTP status, stable code, plain-words detail."""

    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Upload too large",
    415: "Unsupported media type",
    422: "Input refused",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
    507: "Insufficient storage",
}


def problem_response(
    status: int, code: str, detail: str, instance: str = "", headers: dict[str, str] | None = None
) -> Response:
    body = {
        "type": f"https://diagnostics.example/problems/{code}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    return Response(
        json.dumps(body, allow_nan=False), status_code=status, media_type=PROBLEM, headers=headers
    )


# --------------------------------------------------------------------------- auth


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: str  # submitter | reviewer | admin
    clinic: str | None  # submitter's clinic
    scope: tuple[str, ...]  # reviewer's clinics

    def visible(self) -> list[str] | None:
        """Clinics this principal may see; None = all (admin)."""
        if self.role == "admin":
            return None
        if self.role == "submitter":
            return [self.clinic] if self.clinic else []
        return list(self.scope)

    def can_see(self, clinic: str) -> bool:
        v = self.visible()
        return v is None or clinic in v


class RateLimiter:
    """Per-clinic sliding window over the last minute, in this process."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.events: dict[str, deque[float]] = defaultdict(deque)
        self.lock = threading.Lock()

    def check(self, clinic: str) -> float | None:
        """None if allowed (and counted); else seconds until the next slot."""
        t = time.monotonic()
        with self.lock:
            q = self.events[clinic]
            while q and t - q[0] > 60.0:
                q.popleft()
            if len(q) >= self.per_minute:
                return max(0.0, 60.0 - (t - q[0]))
            q.append(t)
            return None


# --------------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self, store: Store, monitor_cfg: MonitorSection | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "diagnostics_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.ack = Histogram(
            "diagnostics_upload_ack_seconds",
            "Time from request to 202 for accepted uploads",
            registry=self.registry,
        )
        self.refusals = Counter(
            "diagnostics_upload_refusals",
            "Uploads refused before a study was made (4xx/5xx), by code, in this process",
            ["code"],
            registry=self.registry,
        )
        self.scoring = Histogram(
            "diagnostics_scoring_seconds",
            "Per-study scoring time in this process (decode + QC + preprocess + model)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )

        class FromStore:
            """Queue depth, studies by status and QC refusals by code, read from the database
            at scrape time, so they count the work of every worker process."""

            def collect(self) -> Any:
                depth = GaugeMetricFamily("diagnostics_queue_depth", "Jobs queued or running")
                depth.add_metric([], store.queue_depth())
                yield depth
                studies = GaugeMetricFamily(
                    "diagnostics_studies", "Studies by status", labels=["status"]
                )
                for k, v in store.status_counts().items():
                    studies.add_metric([k], v)
                yield studies
                refusals = CounterMetricFamily(
                    "diagnostics_qc_refusals", "Studies refused by QC, by code", labels=["code"]
                )
                for k, v in store.qc_refusal_counts().items():
                    refusals.add_metric([k], v)
                yield refusals
                yield from population_gauges()

        mcfg = monitor_cfg or MonitorSection()

        def population_gauges() -> Any:
            """Today's (UTC) shares per site: outside the population or the training
            distribution (refused or flagged), AI-positive calls, and the alert."""
            today = daily(store, None, mcfg.model_copy(update={"days": 1}))
            gauges = {
                "outside_share": GaugeMetricFamily(
                    "diagnostics_outside_population_share",
                    "Share of today's studies refused or flagged as outside the model's "
                    "intended population or training distribution, per site (UTC day)",
                    labels=["clinic", "day"],
                ),
                "positive_share": GaugeMetricFamily(
                    "diagnostics_positive_share",
                    "Share of today's studies with a call that the AI called positive, per site",
                    labels=["clinic", "day"],
                ),
                "alert": GaugeMetricFamily(
                    "diagnostics_population_alert",
                    "1 when today's outside share reached monitor.alert_share (with at least "
                    "monitor.min_studies studies), per site",
                    labels=["clinic", "day"],
                ),
            }
            outcomes = GaugeMetricFamily(
                "diagnostics_studies_today",
                "Today's finished studies per site by population outcome",
                labels=["clinic", "day", "outcome"],
            )
            for r in today:
                key = [r["clinic"], r["day"]]
                gauges["outside_share"].add_metric(key, r["outside_share"])
                if r["positive_share"] is not None:
                    gauges["positive_share"].add_metric(key, r["positive_share"])
                gauges["alert"].add_metric(key, 1.0 if r["alert"] else 0.0)
                for outcome in ("refused_population", "flagged_population", "refused_ood"):
                    outcomes.add_metric([*key, outcome], r[outcome])
                outcomes.add_metric([*key, "all"], r["studies"])
            yield from gauges.values()
            yield outcomes

        self.registry.register(FromStore())

    def observe_result(self, result: ScoreResult) -> None:
        self.scoring.observe(result.timing_ms.get("total", 0.0) / 1000.0)


# --------------------------------------------------------------------------- app


def create_app(
    cfg: ServeConfig,
    model: OnnxModel,
    store: Store,
    data_dir: Path,
    model_source: ModelSource | None = None,
) -> FastAPI:
    holder = ModelHolder(model, cfg, data_dir / "heatmaps", model_source)
    metrics = Metrics(store, cfg.monitor)
    limiter = RateLimiter(cfg.limits.rate_per_minute)
    max_bytes = int(cfg.limits.max_upload_mb * 1024 * 1024)
    reserve = int(cfg.limits.disk_reserve_mb * 1024 * 1024)
    worker = Worker(
        store,
        holder,
        lease_s=cfg.worker.lease_s,
        batch_size=cfg.model.batch_size,
        poll_s=cfg.worker.poll_s,
        retry_delay_s=cfg.worker.retry_delay_s,
        on_result=metrics.observe_result,
        alerts=AlertLog(store, cfg.monitor),
    )

    # A partial upload older than the longest possible request is abandoned (a crash, a killed
    # process): removed at start and every minute, by every process sharing the blob store.
    part_max_age_s = cfg.timeouts.body_total_s + 120.0

    def janitor(stop: threading.Event) -> None:
        while not stop.wait(min(60.0, cfg.timeouts.body_total_s)):
            try:
                store.blobs.clean_temp(part_max_age_s)
            except OSError as exc:
                log.warning("partial uploads not cleaned: %s", type(exc).__name__)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        store.blobs.clean_temp(part_max_age_s)
        thread = stop = None
        if cfg.worker.in_process:
            thread, stop = start_thread(worker)
        refresher_stop = threading.Event()
        threading.Thread(
            target=janitor, args=(refresher_stop,), name="part-janitor", daemon=True
        ).start()
        if model_source is not None and cfg.model.refresh_s > 0:
            threading.Thread(
                target=holder.run,
                args=(refresher_stop, cfg.model.refresh_s),
                name="model-refresh",
                daemon=True,
            ).start()
        log.info(
            "service ready: model %s sha256 %s on %s, auth %s, worker %s",
            model.metadata.name,
            model.sha256[:12],
            model.provider,
            "on" if cfg.auth else "OFF (dev)",
            "in-process" if cfg.worker.in_process else "external",
        )
        yield
        refresher_stop.set()
        if stop is not None:
            stop.set()
            worker.wake.set()
            thread.join(timeout=30)

    app = FastAPI(
        title="diagnostics clinic service",
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if cfg.api_docs else None,
        openapi_url="/openapi.json" if cfg.api_docs else None,
        redoc_url=None,
    )
    app.add_middleware(
        BodyTimeout, idle_s=cfg.timeouts.body_idle_s, total_s=cfg.timeouts.body_total_s
    )
    app.state.store, app.state.holder, app.state.worker = store, holder, worker
    from diagnostics.serve import web

    web.install(app, cfg, store, holder, data_dir)  # the review page under /review

    # ----------------------------------------------------------------- errors

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        request.state.problem_code = exc.code  # for the request log line
        return problem_response(exc.status, exc.code, exc.detail, request.url.path, exc.headers)

    @app.exception_handler(StoreBusy)
    async def _busy(request: Request, exc: StoreBusy) -> Response:
        return problem_response(
            503,
            "database_busy",
            "The database is busy; retry shortly.",
            request.url.path,
            {"Retry-After": "2"},
        )

    @app.exception_handler(StoreFull)
    async def _full(request: Request, exc: StoreFull) -> Response:
        log.error("database full on %s %s", request.method, request.url.path)
        return problem_response(
            507, "insufficient_storage", "The service's database is full.", request.url.path
        )

    @app.exception_handler(RequestTimedOut)
    async def _timed_out(request: Request, exc: RequestTimedOut) -> Response:
        request.state.problem_code = "request_timeout"
        return problem_response(
            408, "request_timeout", exc.message, request.url.path, {"Connection": "close"}
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
            for e in exc.errors()
        ]
        return problem_response(422, "invalid_request", "; ".join(parts), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return problem_response(exc.status_code, code, str(exc.detail), request.url.path)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.error("unhandled %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
        return problem_response(
            500, "internal_error", "The service failed; the error was logged.", request.url.path
        )

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        code = getattr(request.state, "problem_code", None)
        log.info(
            "%s %s %d%s %.1f ms",
            request.method,
            path,
            response.status_code,
            f" {code}" if code else "",
            (time.perf_counter() - t0) * 1000,
        )
        return response

    # ----------------------------------------------------------------- auth

    def principal(request: Request) -> Principal:
        if not cfg.auth:
            return Principal("dev", "admin", None, ())
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        key = key or request.headers.get("x-api-key", "").strip()
        if not key:
            raise Problem(
                401,
                "unauthenticated",
                "Send your API key as 'Authorization: Bearer <key>'.",
                {"WWW-Authenticate": "Bearer"},
            )
        row = store.authenticate(key)
        if row is None:
            raise Problem(
                401,
                "invalid_key",
                "The API key is unknown or revoked.",
                {"WWW-Authenticate": "Bearer"},
            )
        return Principal(row.id, row.role, row.clinic_id, tuple(row.scope or ()))

    def need(p: Principal, *roles: str) -> None:
        if p.role not in roles:
            raise Problem(403, "role_forbidden", f"This needs a {' or '.join(roles)} key.")

    def visible_study(p: Principal, study_id: str) -> Any:
        study = store.get_study(study_id)
        if study is None or not p.can_see(study.clinic_id):
            raise Problem(404, "study_not_found", "No such study.")  # same answer: no leak
        return study

    # ----------------------------------------------------------------- clinic API

    def admit(clinic: str, idem: str | None, length: str | None) -> None:
        """Refusals decided before the body is read: size, disk, queue, rate. A retry of an
        upload already accepted under its Idempotency-Key skips queue and rate limits."""
        if length and length.isdigit() and int(length) > max_bytes + BODY_OVERHEAD:
            raise Problem(
                413,
                "upload_too_large",
                f"The upload is larger than the limit of {cfg.limits.max_upload_mb:g} MB.",
            )
        if shutil.disk_usage(store.blobs.root).free < reserve:
            raise Problem(
                507, "insufficient_storage", "The service is low on disk space; try later."
            )
        if idem is not None and store.has_idempotency_key(clinic, idem):
            return
        if store.queue_depth() >= cfg.limits.max_queue:
            raise Problem(
                503,
                "queue_full",
                "Too many studies are waiting; retry later.",
                {"Retry-After": "30"},
            )
        wait = limiter.check(clinic)
        if wait is not None:
            raise Problem(
                429,
                "rate_limited",
                f"More than {cfg.limits.rate_per_minute} uploads a minute from this clinic.",
                {"Retry-After": str(int(wait) + 1)},
            )

    def accept(clinic: str, actor: str, idem: str | None, got: Any) -> tuple[Any, bool]:
        """Check the received file and make it a study (blocking work: run in a thread)."""
        from diagnostics.imaging import sniff_format

        if got.size == 0:
            raise Problem(400, "empty_file", "The file is empty (0 bytes).")
        fmt = sniff_format(got.head)
        if fmt is None:
            raise Problem(
                415,
                "unsupported_media_type",
                "The file is not DICOM (Part 10), PNG or JPEG, whatever its name or "
                "declared type says.",
            )
        try:
            info, _ = qc.check_intake(got.path.read_bytes(), cfg.qc)
        except qc.QCRefusal as exc:
            raise Problem(422, exc.code, exc.result.message) from None
        existing, conflict = store.find_existing(clinic, got.sha256, info.sop_instance_uid, idem)
        if conflict:
            raise Problem(409, conflict, _conflict_text(conflict))
        if existing is not None:
            return existing, False
        try:
            store.blobs.commit(got.path, got.sha256)  # durable before the row commits
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise Problem(507, "insufficient_storage", "The service ran out of disk.") from None
            raise
        try:
            return store.create_study(
                clinic=clinic,
                actor=actor,
                sha256=got.sha256,
                size=got.size,
                fmt=fmt,
                filename=got.filename if cfg.privacy.store_filenames else "",
                sop_uid=info.sop_instance_uid,
                idempotency_key=idem,
                max_attempts=cfg.worker.max_attempts,
            )
        except Conflict as exc:
            raise Problem(409, exc.code, _conflict_text(exc.code)) from None
        except StoreFull:  # 507; the file goes too, unless an earlier study holds the same bytes
            if not store.blob_in_use(got.sha256):
                store.blobs.remove(got.sha256)
            raise

    @app.post("/v1/studies", status_code=202)
    async def upload(request: Request, p: Principal = Depends(principal)) -> Response:
        if p.role != "submitter" and not (p.role == "admin" and not cfg.auth):
            need(p, "submitter")
        try:
            return await receive_study(request, p)
        except Problem as exc:  # every refused upload is audited and counted, by code
            metrics.refusals.labels(exc.code).inc()
            await run_in_threadpool(
                store.log_access, p.key_id, "upload.refused", "upload", exc.code
            )
            raise

    async def receive_study(request: Request, p: Principal) -> Response:
        t0 = time.perf_counter()
        clinic = p.clinic or "dev"
        idem = request.headers.get("idempotency-key", "").strip() or None
        if idem is not None and len(idem) > 128:
            raise Problem(400, "bad_idempotency_key", "Idempotency-Key is over 128 characters.")
        await run_in_threadpool(admit, clinic, idem, request.headers.get("content-length"))
        temp = store.blobs.temp_file()
        try:
            try:
                got = await receive_file(
                    request.headers.get("content-type", ""),
                    request.stream(),
                    temp,
                    max_bytes=max_bytes,
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
                    raise Problem(
                        507, "insufficient_storage", "The service ran out of disk."
                    ) from None
                raise
            study, created = await run_in_threadpool(accept, clinic, p.key_id, idem, got)
        finally:
            temp.unlink(missing_ok=True)
        if created:
            worker.wake.set()
            metrics.ack.observe(time.perf_counter() - t0)
        else:
            await run_in_threadpool(
                store.log_access, p.key_id, "study.duplicate", "study", study.id
            )
        location = f"/v1/studies/{study.id}"
        body = {**study_summary(study), "location": location, "duplicate": not created}
        return JSONResponse(body, status_code=202, headers={"Location": location})

    @app.get("/v1/studies/{study_id}")
    def get_study(study_id: str, p: Principal = Depends(principal)) -> Response:
        visible_study(p, study_id)
        view = store.study_view(study_id)
        store.log_access(p.key_id, "study.read", "study", study_id)
        return _json(view)

    @app.get("/v1/studies")
    def list_studies(
        p: Principal = Depends(principal),
        status: str | None = Query(None),
        since: datetime | None = Query(None, description="ISO 8601"),
        limit: int = Query(100, ge=1, le=1000),
    ) -> Response:
        from diagnostics.serve.store import STATUSES

        if status is not None and status not in STATUSES:
            raise Problem(422, "invalid_status", f"status is one of {', '.join(STATUSES)}.")
        if since is not None:  # SQLite compares stored UTC text: convert, whatever the offset
            since = since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC)
        rows = store.list_studies(p.visible(), status=status, since=since, limit=limit)
        store.log_access(p.key_id, "study.list", "clinic", p.clinic or p.role)
        return _json({"studies": [study_summary(s) for s in rows]})

    @app.get("/v1/studies/{study_id}/heatmaps/{label}")
    def heatmap(study_id: str, label: str, p: Principal = Depends(principal)) -> Response:
        visible_study(p, study_id)
        view = store.study_view(study_id) or {}
        for f in view.get("findings", []):
            if f["label"] == label and f["heatmap"]:
                path = data_dir / "heatmaps" / f["heatmap"]
                if path.is_file():
                    store.log_access(p.key_id, "heatmap.read", "study", study_id)
                    return FileResponse(path, media_type="image/png")
        raise Problem(404, "heatmap_not_found", "No heatmap for that finding.")

    # ----------------------------------------------------------------- reviewer API

    @app.get("/v1/worklist")
    def worklist(
        p: Principal = Depends(principal), limit: int = Query(100, ge=1, le=1000)
    ) -> Response:
        need(p, "reviewer", "admin")
        items = store.worklist(p.visible(), limit=limit)
        store.log_access(p.key_id, "worklist.read", "worklist", p.key_id)
        return _json({"studies": items})

    @app.post("/v1/studies/{study_id}/reviews", status_code=201)
    def review(study_id: str, body: ReviewBody, p: Principal = Depends(principal)) -> Response:
        need(p, "reviewer", "admin")
        study = visible_study(p, study_id)
        try:
            ids = record_reviews(store, study, p.key_id, body.reviews)
        except ReviewError as exc:
            raise Problem(exc.status, exc.code, exc.detail) from None
        return _json({"reviews": ids, "study": study_id}, status=201)

    @app.get("/v1/studies/{study_id}/report")
    def report(
        study_id: str,
        p: Principal = Depends(principal),
        lang: str = Query("en", pattern="^(en|vi)$"),
        format: str = Query("fhir", pattern="^(fhir|text)$"),
    ) -> Response:
        from diagnostics.serve.reports import fhir_report, shown_model, text_report

        study = visible_study(p, study_id)
        if study.status != "scored":
            raise Problem(409, "not_scored", f"The study is {study.status}; there is no report.")
        view = store.study_view(study_id)
        store.log_access(
            p.key_id, "report.read", "study", study_id, format=format, **shown_model(view)
        )
        if format == "text":
            return Response(text_report(view, lang), media_type="text/plain; charset=utf-8")
        doc = fhir_report(view, lang, study.sop_instance_uid)
        return Response(json.dumps(doc, allow_nan=False), media_type="application/fhir+json")

    @app.get("/v1/stats/agreement")
    def agreement(p: Principal = Depends(principal)) -> Response:
        need(p, "reviewer", "admin")
        return _json({"agreement": store.agreement(p.visible())})

    @app.get("/v1/stats/population")
    def population(p: Principal = Depends(principal)) -> Response:
        """Per site and day: refused or flagged outside the population or distribution, and
        the share called positive, with the alert level from serve.yaml."""
        need(p, "reviewer", "admin")
        return _json(
            {
                "alert_share": cfg.monitor.alert_share,
                "min_studies": cfg.monitor.min_studies,
                "days": daily(store, p.visible(), cfg.monitor),
            }
        )

    # ----------------------------------------------------------------- health

    @app.get("/health/live")
    def live() -> Response:
        return _json({"status": "ok"})

    @app.get("/health/ready")
    def ready() -> Response:
        checks: dict[str, Any] = {}
        status = "ok"
        try:
            store.ping()
            checks["database"] = {"ok": not store.full, "dialect": store.dialect}
            if store.full:  # reads work; uploads and reviews answer 507
                checks["database"]["error"] = "full"
                status = "unavailable"
        except Exception as exc:
            checks["database"] = {"ok": False, "error": type(exc).__name__}
            status = "unavailable"
        disk = _disk_check(store.blobs.tmp, reserve)
        checks["disk"] = disk
        if not disk["ok"]:
            status = "unavailable"
        current = holder.model
        checks["model"] = {"ok": True, **current.describe(), "refresh_error": holder.last_error}
        if current.fallback and status == "ok":
            status = "degraded"  # CUDA wanted, CPU in use: scoring works, slower
        checks["worker"] = {"in_process": cfg.worker.in_process}
        return _json(
            {"status": status, "checks": checks}, status=503 if status == "unavailable" else 200
        )

    @app.post("/v1/admin/model/reload")
    def reload_model(p: Principal = Depends(principal)) -> Response:
        """Check the model source now (e.g. right after an alias moved)."""
        need(p, "admin")
        switched = holder.refresh()
        store.log_access(
            p.key_id,
            "model.reload",
            "model",
            holder.model.sha256[:16],
            switched=switched,
            version=holder.model.version,
        )
        return _json(
            {"switched": switched, "model": holder.model.describe(), "error": holder.last_error}
        )

    @app.get("/metrics")
    def prometheus(p: Principal = Depends(principal)) -> Response:
        """Prometheus text format, for an admin key (a scraper's bearer token): the figures
        show each clinic's volume and refusals."""
        need(p, "admin")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _disk_check(folder: Path, reserve: int) -> dict[str, Any]:
    """Free space above the reserve, and a small file can actually be written (a full disk with
    `disk_reserve_mb: 0` still has 0 bytes free)."""
    free = shutil.disk_usage(folder).free
    out: dict[str, Any] = {"ok": free > reserve, "free_mb": round(free / 2**20)}
    probe = folder / f".ready-{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        out.update(ok=False, error=errno.errorcode.get(exc.errno or 0, type(exc).__name__))
    finally:
        probe.unlink(missing_ok=True)
    return out


def _conflict_text(code: str) -> str:
    return {
        "idempotency_key_reused": "This Idempotency-Key was used before with a different file.",
        "sop_instance_conflict": (
            "A different file with the same SOP Instance UID was already received from this clinic."
        ),
    }.get(code, "The upload conflicts with an earlier one.")


def _json(doc: Any, status: int = 200) -> Response:
    """JSON that refuses NaN: a NaN would mean a bug upstream, never a score."""
    return Response(
        json.dumps(doc, allow_nan=False, default=_default),
        status_code=status,
        media_type="application/json",
    )


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, datetime):
        return o.isoformat()
    raise TypeError(type(o).__name__)
