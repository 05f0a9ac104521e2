"""Admission control for uploads: the refusals decided before the body is read (size, disk,
queue, rate), and turning a received file into a study (format, intake QC, duplicates,
durable blob, then the row)."""

from __future__ import annotations

import errno
import shutil
import threading
import time
from collections import defaultdict, deque
from typing import Any

from diagnostics.serve import qc
from diagnostics.serve.api.errors import Problem
from diagnostics.serve.config import ServeConfig
from diagnostics.serve.store import Conflict, Store, StoreFull
from diagnostics.serve.upload import BODY_OVERHEAD, ReceivedFile


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


def max_upload_bytes(cfg: ServeConfig) -> int:
    return int(cfg.limits.max_upload_mb * 1024 * 1024)


def disk_reserve_bytes(cfg: ServeConfig) -> int:
    return int(cfg.limits.disk_reserve_mb * 1024 * 1024)


def admit(
    cfg: ServeConfig,
    store: Store,
    limiter: RateLimiter,
    clinic: str,
    idem: str | None,
    length: str | None,
) -> None:
    """Refusals decided before the body is read: size, disk, queue, rate. A retry of an
    upload already accepted under its Idempotency-Key skips the queue limit (its study is
    queued already), never the rate limit (its bytes are not known yet)."""
    if length and length.isdigit() and int(length) > max_upload_bytes(cfg) + BODY_OVERHEAD:
        raise Problem(
            413,
            "upload_too_large",
            f"The upload is larger than the limit of {cfg.limits.max_upload_mb:g} MB.",
        )
    if shutil.disk_usage(store.blobs.root).free < disk_reserve_bytes(cfg):
        raise Problem(507, "insufficient_storage", "The service is low on disk space; try later.")
    known = idem is not None and store.has_idempotency_key(clinic, idem)
    if not known and store.queue_depth() >= cfg.limits.max_queue:
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


def accept(
    cfg: ServeConfig,
    store: Store,
    clinic: str,
    actor: str,
    idem: str | None,
    got: ReceivedFile,
) -> tuple[Any, bool]:
    """Check the received file and make it a study (blocking work: run in a thread).

    Returns the study and whether it was created (False: the same upload came before)."""
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
        raise Problem(409, conflict, conflict_text(conflict))
    if existing is not None:
        return existing, False
    created_blob = not store.blobs.path(got.sha256).exists()
    try:
        store.blobs.commit(got.path, got.sha256)  # durable before the row commits
    except FileNotFoundError:  # its .part was taken for abandoned (held up over 2 minutes)
        raise Problem(
            503,
            "upload_expired",
            "The upload waited too long; send it again.",
            {"Retry-After": "5"},
        ) from None
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
    except (Conflict, StoreFull) as exc:
        # 409 (a concurrent upload won) or 507: the file this request stored goes too, unless a
        # study holds the same bytes
        if created_blob and not store.blob_in_use(got.sha256):
            store.blobs.remove(got.sha256)
        if isinstance(exc, Conflict):
            raise Problem(409, exc.code, conflict_text(exc.code)) from None
        raise


def conflict_text(code: str) -> str:
    return {
        "idempotency_key_reused": "This Idempotency-Key was used before with a different file.",
        "sop_instance_conflict": (
            "A different file with the same SOP Instance UID was already received from this clinic."
        ),
    }.get(code, "The upload conflicts with an earlier one.")
