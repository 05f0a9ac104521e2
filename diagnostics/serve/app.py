"""The clinic service: FastAPI app for clinics (upload, results), reviewers (worklist, reviews),
health and metrics, and the review page. Torch-free; started by `diagnostics serve`.

`create_app` builds the service's parts and puts them on `app.state` (`cfg`, `store`, `holder`,
`worker`, `metrics`, `limiter`, `data_dir`, `model_source`, `risk_models`); the routes, one
router per area in `diagnostics.serve.api` and `diagnostics.serve.web`, take them from there.
Here: the lifespan (worker thread, model refresh, the `.part` janitor), middleware (request log
line and counter, security headers, body time limits) and error handlers.

Every error is RFC 7807 `application/problem+json` with a stable `code`. A study is answered
202 only after its blob is fsynced and renamed and its row committed. A clinic's identity comes
from its API key, never from the request; another clinic's study answers 404.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from diagnostics.serve import web
from diagnostics.serve.api import admin, dicomweb, health, reviews, risk, studies
from diagnostics.serve.api.admission import RateLimiter
from diagnostics.serve.api.deps import Principal
from diagnostics.serve.api.errors import (
    PROBLEM,
    TITLES,
    Problem,
    install_error_handlers,
    problem_response,
)
from diagnostics.serve.api.metrics import Metrics
from diagnostics.serve.config import ServeConfig
from diagnostics.serve.models import ModelHolder, ModelLoader, ModelSource
from diagnostics.serve.runner import OnnxModel
from diagnostics.serve.server import BodyTimeout, RequestGuard
from diagnostics.serve.store import Store
from diagnostics.serve.worker import Worker, start_thread, worker_for

__all__ = [
    "PROBLEM",
    "SECURITY_HEADERS",
    "TITLES",
    "Metrics",
    "Principal",
    "Problem",
    "RateLimiter",
    "create_app",
    "problem_response",
]

log = logging.getLogger("diagnostics.serve")

# Sent with every response. The review pages use no inline script or style, so the policy can
# be strict; they are never framed (clickjacking) and types are never sniffed.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(
    cfg: ServeConfig,
    model: OnnxModel,
    store: Store,
    data_dir: Path,
    model_source: ModelSource | None = None,
    risk_models: dict[str, Any] | None = None,
    model_loader: ModelLoader | None = None,
) -> FastAPI:
    holder = ModelHolder(model, cfg, data_dir / "heatmaps", model_source, model_loader)
    metrics = Metrics(store, cfg.monitor)
    worker = worker_for(store, holder, cfg, on_result=metrics.observe_result)
    app = FastAPI(
        title="diagnostics clinic service",
        version="1",
        lifespan=_lifespan,
        docs_url="/docs" if cfg.api_docs else None,
        openapi_url="/openapi.json" if cfg.api_docs else None,
        redoc_url=None,
    )
    app.state.cfg, app.state.data_dir, app.state.model_source = cfg, data_dir, model_source
    app.state.store, app.state.holder, app.state.worker = store, holder, worker
    app.state.metrics, app.state.limiter = metrics, RateLimiter(cfg.limits.rate_per_minute)
    app.state.risk_models = risk_models or {}  # name -> serve.risk.RiskModel

    # Middleware, innermost first: body time limits, the review page's session, then the
    # request log line, counter and security headers around everything.
    app.add_middleware(
        BodyTimeout, idle_s=cfg.timeouts.body_idle_s, total_s=cfg.timeouts.body_total_s
    )
    app.add_middleware(RequestGuard, max_body=int(cfg.limits.max_body_kb * 1024))
    web.install(app)  # the review page under /review (routers, static files, session)
    install_error_handlers(app)
    app.middleware("http")(_count_and_secure)

    routers = (studies.router, reviews.router, risk.router, health.router, admin.router)
    for router in (*routers, dicomweb.router):
        app.include_router(router)
    return app


# --------------------------------------------------------------------------- lifespan


def _part_max_age_s(cfg: ServeConfig) -> float:
    """A partial upload older than the longest possible request is abandoned (a crash, a
    killed process): removed at start and every minute, by every process sharing the blobs."""
    return cfg.timeouts.body_total_s + 120.0


def _janitor(store: Store, cfg: ServeConfig, stop: threading.Event) -> None:
    while not stop.wait(min(60.0, cfg.timeouts.body_total_s)):
        try:
            store.blobs.clean_temp(_part_max_age_s(cfg))
        except OSError as exc:
            log.warning("partial uploads not cleaned: %s", type(exc).__name__)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    cfg: ServeConfig = app.state.cfg
    store: Store = app.state.store
    holder: ModelHolder = app.state.holder
    worker: Worker = app.state.worker
    model = holder.model  # the model it starts with, before any refresh
    store.blobs.clean_temp(_part_max_age_s(cfg))
    thread = stop = None
    if cfg.worker.in_process:
        thread, stop = start_thread(worker)
        app.state.worker_thread = thread  # /health/ready checks it is alive
    refresher_stop = threading.Event()
    threading.Thread(
        target=_janitor, args=(store, cfg, refresher_stop), name="part-janitor", daemon=True
    ).start()
    # The DICOM edge, when enabled: the C-STORE receiver feeds the same store and jobs
    receiver = None
    if cfg.dicom.enabled:
        from diagnostics.serve.dicom.receiver import DicomReceiver

        receiver = DicomReceiver(cfg, store, on_stored=worker.wake.set)
        receiver.start()
        app.state.dicom_receiver = receiver
    # ... and results go back to each clinic's PACS (SR, heatmap captures), from the outbox
    exporter = exporter_thread = exporter_stop = None
    if cfg.dicom.export.enabled and cfg.dicom.destinations:
        from diagnostics.serve.dicom.export import Exporter
        from diagnostics.serve.dicom.export import start_thread as start_exporter

        exporter = Exporter(cfg, store, app.state.data_dir)
        exporter_thread, exporter_stop = start_exporter(exporter)
        app.state.exporter = exporter
    if app.state.model_source is not None and cfg.model.refresh_s > 0:
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
    if receiver is not None:  # no new instance while the worker stops
        receiver.stop()
    if exporter is not None and exporter_stop is not None and exporter_thread is not None:
        exporter_stop.set()
        exporter.wake.set()
        exporter_thread.join(timeout=cfg.dicom.export.timeout_s + 5)
    if stop is not None:
        stop.set()
        worker.wake.set()
        if thread is not None:
            thread.join(timeout=30)


# --------------------------------------------------------------------------- middleware


async def _count_and_secure(request: Request, call_next: Any) -> Response:
    """Security headers on every response; one log line and one counter per request."""
    t0 = time.perf_counter()
    response: Response = await call_next(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    route = request.scope.get("route")
    path = getattr(route, "path", "unmatched")
    metrics: Metrics = request.app.state.metrics
    method = request.method if request.method in HTTP_METHODS else "other"  # bounded labels
    metrics.requests.labels(method, path, str(response.status_code)).inc()
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
