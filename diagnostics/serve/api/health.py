"""Health and metrics: liveness (the process answers), readiness (database, disk, model,
worker; 503 when the service cannot take uploads) and Prometheus metrics for an admin key."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from diagnostics.serve.api.admission import disk_reserve_bytes
from diagnostics.serve.api.deps import (
    ConfigDep,
    HolderDep,
    MetricsDep,
    PrincipalDep,
    StoreDep,
    need,
)
from diagnostics.serve.api.errors import json_response

router = APIRouter(tags=["health"])


@router.get("/health/live")
def live() -> Response:
    return json_response({"status": "ok"})


@router.get("/health/ready")
def ready(request: Request, cfg: ConfigDep, store: StoreDep, holder: HolderDep) -> Response:
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
    disk = disk_check(store.blobs.tmp, disk_reserve_bytes(cfg))
    checks["disk"] = disk
    if not disk["ok"]:
        status = "unavailable"
    current = holder.model
    checks["model"] = {"ok": True, **current.describe(), "refresh_error": holder.last_error}
    if current.fallback and status == "ok":
        status = "degraded"  # CUDA wanted, CPU in use: scoring works, slower
    risk = getattr(request.app.state, "risk_models", None) or {}
    if risk:  # loaded once at start: each answers from memory
        checks["risk_models"] = {
            name: {"sha256": m.sha256, "label": m.label, "version": m.version}
            for name, m in risk.items()
        }
    thread = getattr(request.app.state, "worker_thread", None)
    alive = thread is None or thread.is_alive()  # None: an external worker (or not started)
    checks["worker"] = {"in_process": cfg.worker.in_process, "ok": alive}
    if not alive:  # uploads would queue for ever
        status = "unavailable"
    if cfg.dicom.enabled or cfg.dicom.destinations:
        receiver = getattr(request.app.state, "dicom_receiver", None)
        exporter = getattr(request.app.state, "exporter", None)
        outbox = store.outbox_counts()
        checks["dicom"] = {
            "receiver": "listening" if receiver is not None else "off",
            "exporter": "on" if exporter is not None else "off",
            # results that stopped after their bounded retries wait for `dicom resend`
            "outbox": outbox,
        }
        if outbox.get("failed") and status == "ok":
            status = "degraded"
    return json_response(
        {"status": status, "checks": checks}, status=503 if status == "unavailable" else 200
    )


@router.get("/metrics")
def prometheus(p: PrincipalDep, metrics: MetricsDep) -> Response:
    """Prometheus text format, for an admin key (a scraper's bearer token): the figures
    show each clinic's volume and refusals."""
    need(p, "admin")
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def disk_check(folder: Path, reserve: int) -> dict[str, Any]:
    """Free space above the reserve, and a small file can actually be written (a full disk with
    `disk_reserve_mb: 0` still has 0 bytes free)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:  # the folder is gone or unreadable
        return {"ok": False, "error": errno.errorcode.get(exc.errno or 0, type(exc).__name__)}
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
