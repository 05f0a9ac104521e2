"""DICOMweb STOW-RS (PS3.18 10.5): a PACS or modality stores instances over HTTP.

`POST /dicomweb/studies[/{study_uid}]` takes `multipart/related; type="application/dicom"`,
one DICOM Part 10 instance per part, with the same API key, admission and intake as an upload:
each instance goes through `intake.ingest` (QC, de-duplication, durable blob, grouped into a
study by its Study Instance UID). The answer is the Store Instances Response Module as
`application/dicom+json`:

- 200 every instance stored (a re-sent one counts as stored), 202 some stored and some failed,
  409 none stored; each failed one in FailedSOPSequence with its FailureReason;
- a refusal of the whole request is problem+json: 400 malformed, 413 too large, 415 not
  multipart/related of application/dicom, 507 out of disk before anything was stored, and the
  admission refusals of an upload (429, 503).

RetrieveURL is left out: the service does not serve WADO-RS. Refused instances are audited and
counted by their stable code, which goes to the audit and the metrics, not into the response.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from diagnostics.imaging import sniff_format
from diagnostics.serve.api.admission import RateLimiter, admit, max_upload_bytes
from diagnostics.serve.api.deps import (
    ConfigDep,
    LimiterDep,
    MetricsDep,
    Principal,
    PrincipalDep,
    StoreDep,
    WorkerDep,
    need,
)
from diagnostics.serve.api.errors import PROBLEM, Problem
from diagnostics.serve.api.metrics import Metrics
from diagnostics.serve.config import ServeConfig
from diagnostics.serve.intake import Intake, ingest
from diagnostics.serve.server import RequestTimedOut
from diagnostics.serve.store import Store, StoreBusy, StoreFull
from diagnostics.serve.upload import BODY_OVERHEAD, UploadError
from diagnostics.serve.upload_related import RelatedPart, receive_parts, related_boundary
from diagnostics.serve.worker import Worker

log = logging.getLogger("diagnostics.serve")

router = APIRouter(tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# FailureReason (0008,1197), PS3.18 / PS3.4 C-STORE statuses
OUT_OF_RESOURCES = 0xA700
DATA_SET_MISMATCH = 0xA900  # does not match the SOP Class, or the study named in the URL
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

_DOCS: dict[str, Any] = {  # hand-written: the body is not a model FastAPI can read
    "response_class": Response,
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "description": "One DICOM Part 10 instance per part (PS3.18 STOW-RS).",
            "content": {
                'multipart/related; type="application/dicom"': {
                    "schema": {"type": "string", "format": "binary"}
                }
            },
        }
    },
    "responses": {
        200: {"description": "All stored", "content": {DICOM_JSON: {}}},
        202: {"description": "Some stored, some failed", "content": {DICOM_JSON: {}}},
        409: {"description": "None stored", "content": {DICOM_JSON: {}}},
        **{
            s: {"description": d, "content": {PROBLEM: {}}}
            for s, d in (
                (400, "Malformed"),
                (413, "Too large"),
                (415, "Not multipart/related of application/dicom"),
                (507, "Out of disk"),
            )
        },
    },
}


@dataclass
class Outcome:
    """What became of one part: stored (`intake`), or refused with a status and stable code."""

    sop_class: str | None
    sop_instance: str | None
    intake: Intake | None = None
    status: int = 0
    code: str = ""
    reason: int = 0  # FailureReason


@router.post("/dicomweb/studies", **_DOCS)
async def store_instances(
    request: Request,
    p: PrincipalDep,
    cfg: ConfigDep,
    store: StoreDep,
    limiter: LimiterDep,
    metrics: MetricsDep,
    worker: WorkerDep,
) -> Response:
    return await _stow(request, None, p, cfg, store, limiter, metrics, worker)


@router.post("/dicomweb/studies/{study_uid}", **_DOCS)
async def store_study_instances(
    study_uid: str,
    request: Request,
    p: PrincipalDep,
    cfg: ConfigDep,
    store: StoreDep,
    limiter: LimiterDep,
    metrics: MetricsDep,
    worker: WorkerDep,
) -> Response:
    return await _stow(request, study_uid, p, cfg, store, limiter, metrics, worker)


async def _stow(
    request: Request,
    study_uid: str | None,
    p: Principal,
    cfg: ServeConfig,
    store: Store,
    limiter: RateLimiter,
    metrics: Metrics,
    worker: Worker,
) -> Response:
    if p.role != "submitter" and not (p.role == "admin" and not cfg.auth):
        need(p, "submitter")
    t0 = time.perf_counter()
    clinic = p.clinic or "dev"
    try:  # refusals of the whole request: audited and counted like an upload's
        if study_uid is not None and (len(study_uid) > 64 or not _UID.match(study_uid)):
            raise Problem(400, "bad_study_uid", "The Study Instance UID in the URL is not a UID.")
        try:
            related_boundary(request.headers.get("content-type", ""))  # before any admission
        except UploadError as exc:
            raise Problem(exc.status, exc.code, exc.message) from None
        length = request.headers.get("content-length")
        await run_in_threadpool(admit, cfg, store, limiter, clinic, None, length)
        parts = await _receive(request, cfg, store)
    except Problem as exc:
        metrics.refusals.labels(exc.code).inc()
        await run_in_threadpool(store.log_access, p.key_id, "stow.refused", "upload", exc.code)
        raise
    try:
        outcomes = await run_in_threadpool(
            store_parts, cfg, store, parts, clinic=clinic, actor=p.key_id, study_uid=study_uid
        )
    finally:  # stored ones were renamed away; refused and duplicate ones go
        for part in parts:
            if part.file is not None:
                part.file.path.unlink(missing_ok=True)

    stored = [o for o in outcomes if o.intake is not None]
    failed = [o for o in outcomes if o.intake is None]
    for o in failed:
        metrics.refusals.labels(o.code).inc()
    await run_in_threadpool(_audit, store, p.key_id, outcomes)
    if any(o.intake.created for o in stored if o.intake is not None):
        worker.wake.set()
        metrics.ack.observe(time.perf_counter() - t0)
    log.info(
        "stow: %d stored, %d failed%s",
        len(stored),
        len(failed),
        f" ({', '.join(sorted({o.code for o in failed}))})" if failed else "",
    )
    if not stored and any(o.status == 507 for o in failed):
        raise Problem(
            507, "insufficient_storage", "The service ran out of disk; nothing was stored."
        )
    if not stored and failed and all(o.status == 503 for o in failed):  # busy: send it again
        raise Problem(
            503,
            failed[0].code,
            "The service is busy; nothing was stored. Send the study again.",
            {"Retry-After": "5"},
        )
    status = 200 if not failed else 202 if stored else 409
    return Response(json.dumps(response_dataset(outcomes)), status, media_type=DICOM_JSON)


async def _receive(request: Request, cfg: ServeConfig, store: Store) -> list[RelatedPart]:
    """Stream the body's parts to temp files; every failure as a Problem."""
    try:
        return await receive_parts(
            request.headers.get("content-type", ""),
            request.stream(),
            store.blobs.temp_file,
            max_part_bytes=max_upload_bytes(cfg),
            max_total_bytes=max_upload_bytes(cfg) + BODY_OVERHEAD,  # as `admit` checks
        )
    except UploadError as exc:
        raise Problem(exc.status, exc.code, exc.message) from None
    except ClientDisconnect:
        raise Problem(400, "client_disconnected", "The upload was interrupted.") from None
    except RequestTimedOut as exc:
        raise Problem(408, "request_timeout", exc.message, {"Connection": "close"}) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise Problem(507, "insufficient_storage", "The service ran out of disk.") from None
        raise


def store_parts(
    cfg: ServeConfig,
    store: Store,
    parts: list[RelatedPart],
    *,
    clinic: str,
    actor: str,
    study_uid: str | None,
) -> list[Outcome]:
    """Ingest each received part in order (blocking: run in a thread). After the disk or the
    database is found full, the rest are not tried."""
    out: list[Outcome] = []
    full = False
    for part in parts:
        if part.file is None:
            refusal = part.refusal or UploadError(415, "part_not_dicom", "Not application/dicom.")
            out.append(_failed(None, None, refusal.status, refusal.code))
            continue
        if sniff_format(part.file.head) != "dicom":  # ingest would take a PNG or JPEG too
            out.append(_failed(None, None, 415, "part_not_dicom"))
            continue
        uids = part_uids(part.file.path)
        sop_class, sop_instance = (uids.sop_class, uids.sop_instance) if uids else (None, None)
        if full:
            out.append(_failed(sop_class, sop_instance, 507, "insufficient_storage"))
        elif uids is not None and study_uid is not None and uids.study != study_uid:
            out.append(_failed(sop_class, sop_instance, 409, "study_uid_mismatch"))
        elif uids is not None and uids.meta_sop_class not in (None, uids.sop_class):
            out.append(_failed(sop_class, sop_instance, 409, "sop_class_mismatch"))
        else:
            try:
                got = ingest(cfg, store, part.file, clinic=clinic, actor=actor, source="stow")
            except Problem as exc:
                out.append(_failed(sop_class, sop_instance, exc.status, exc.code))
            except StoreFull:
                out.append(_failed(sop_class, sop_instance, 507, "insufficient_storage"))
            except StoreBusy:
                out.append(_failed(sop_class, sop_instance, 503, "database_busy"))
            else:
                inst = got.instance
                sop = (inst.sop_class_uid or sop_class, inst.sop_instance_uid or sop_instance)
                out.append(Outcome(*sop, intake=got))
            full = full or out[-1].status == 507
    return out


def _failed(sop_class: str | None, sop_instance: str | None, status: int, code: str) -> Outcome:
    return Outcome(
        sop_class, sop_instance, status=status, code=code, reason=failure_reason(status, code)
    )


def failure_reason(status: int, code: str) -> int:
    """FailureReason (0008,1197) for a refusal's HTTP status and code."""
    if code in ("study_uid_mismatch", "sop_class_mismatch"):
        return DATA_SET_MISMATCH
    if status in (503, 507):  # busy or full: a later retry may succeed
        return OUT_OF_RESOURCES
    if status in (400, 409, 415, 422):  # bad input, QC, a full study: resending will not help
        return CANNOT_UNDERSTAND
    return PROCESSING_FAILURE


@dataclass(frozen=True)
class PartUIDs:
    """The UIDs of a received instance, each None when absent or damaged."""

    sop_class: str | None
    sop_instance: str | None
    study: str | None
    meta_sop_class: str | None  # the file meta's Media Storage SOP Class UID


def part_uids(path: Path) -> PartUIDs | None:
    """The UIDs of a received part; None when it is not readable DICOM (ingest says why).
    Read with pydicom kept quiet: its warnings quote UIDs, which must not reach the logs."""
    import pydicom

    from diagnostics.imaging import quiet_pydicom

    keywords = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"]
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=keywords)
            meta = getattr(ds, "file_meta", None)
            return PartUIDs(
                sop_class=_uid_or_none(ds, "SOPClassUID"),
                sop_instance=_uid_or_none(ds, "SOPInstanceUID"),
                study=_uid_or_none(ds, "StudyInstanceUID"),
                meta_sop_class=_uid_or_none(meta, "MediaStorageSOPClassUID") if meta else None,
            )
    except Exception:  # not DICOM, or damaged beyond reading
        return None


def _uid_or_none(ds: Any, keyword: str) -> str | None:
    from diagnostics.imaging import ImageError, instance_uid

    try:
        return instance_uid(ds, keyword)
    except ImageError:
        return None


def _audit(store: Store, actor: str, outcomes: list[Outcome]) -> None:
    for o in outcomes:
        if o.intake is None:
            store.log_access(actor, "stow.refused", "upload", o.code)
        elif not o.intake.created:
            store.log_access(actor, "instance.duplicate", "instance", o.intake.instance.id)


def response_dataset(outcomes: list[Outcome]) -> dict[str, Any]:
    """The Store Instances Response Module in the DICOM JSON model (PS3.18 F.2), tags in
    order: FailedSOPSequence (0008,1198), then ReferencedSOPSequence (0008,1199). An empty
    sequence is left out."""
    failed, stored = [], []
    for o in outcomes:
        item: dict[str, Any] = {}
        if o.sop_class:
            item["00081150"] = {"vr": "UI", "Value": [o.sop_class]}
        if o.sop_instance:
            item["00081155"] = {"vr": "UI", "Value": [o.sop_instance]}
        if o.intake is None:
            item["00081197"] = {"vr": "US", "Value": [o.reason]}
            failed.append(item)
        else:
            stored.append(item)
    doc: dict[str, Any] = {}
    if failed:
        doc["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        doc["00081199"] = {"vr": "SQ", "Value": stored}
    return doc
