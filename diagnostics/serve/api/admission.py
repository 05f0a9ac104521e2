"""Admission control for uploads: the refusals decided before the body is read (size, disk,
queue, rate), and handing a received file to `intake.ingest`."""

from __future__ import annotations

import shutil
import threading
import time
from collections import defaultdict, deque
from typing import Any

from diagnostics.serve.api.errors import Problem
from diagnostics.serve.config import ServeConfig
from diagnostics.serve.intake import ingest
from diagnostics.serve.store import Store
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
    check_disk(cfg, store)
    known = idem is not None and store.has_idempotency_key(clinic, idem)
    if not known and store.queue_depth() >= cfg.limits.max_queue:
        raise Problem(
            503,
            "queue_full",
            "Too many studies are waiting; retry later.",
            {"Retry-After": "30"},
        )
    check_rate(cfg, limiter, clinic)


def check_disk(cfg: ServeConfig, store: Store) -> None:
    """507 below the configured free-space reserve: nothing more is written."""
    if shutil.disk_usage(store.blobs.root).free < disk_reserve_bytes(cfg):
        raise Problem(507, "insufficient_storage", "The service is low on disk space; try later.")


def check_rate(cfg: ServeConfig, limiter: RateLimiter, clinic: str) -> None:
    """429 past the clinic's requests a minute (an upload, or a request of risk records)."""
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
    *,
    study_id: str | None = None,
    complete: bool | None = None,
) -> tuple[Any, bool]:
    """Make a received HTTP upload an image of a study (blocking work: run in a thread).

    Returns the study and whether the image was new (False: the same upload came before)."""
    done = ingest(
        cfg,
        store,
        got,
        clinic=clinic,
        actor=actor,
        source="http",
        idempotency_key=idem,
        study_id=study_id,
        complete=complete,
    )
    return done.study, done.created
