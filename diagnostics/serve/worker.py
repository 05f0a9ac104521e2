"""Leased job processing: claim queued studies, run QC and the model, store the outcome.

Runs in the API process (a thread) by default, or alone as `diagnostics worker`. Any number of
workers may share one database:

- a job is claimed with a lease (PostgreSQL: `FOR UPDATE SKIP LOCKED`);
- the outcome is stored only while the lease is still this worker's, in one transaction with
  the findings, so a job is never scored twice;
- after a crash, a job whose lease expired is claimed again; after `max_attempts` it is
  `failed`, visible to reviewers. No job is ever deleted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any

from diagnostics.serve.runner import Scorer, ScoreResult
from diagnostics.serve.store import LeaseLost, Store, StoreBusy

log = logging.getLogger(__name__)

# Failures that another attempt cannot fix: the job ends at once.
PERMANENT = {"non_finite_output", "blob_missing", "processing_error"}


def worker_id() -> str:
    return f"{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        store: Store,
        scorer: Scorer | Any,
        *,
        lease_s: float = 60.0,
        batch_size: int = 8,
        poll_s: float = 0.5,
        retry_delay_s: float = 5.0,
        owner: str | None = None,
        on_result: Callable[[ScoreResult], None] | None = None,
        alerts: Any = None,
    ) -> None:
        self.store = store
        # a Scorer, or a ModelHolder whose current scorer is read at each batch
        self._scorer = scorer
        self.lease_s = lease_s
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.retry_delay_s = retry_delay_s
        self.owner = owner or worker_id()
        self.on_result = on_result
        self.alerts = alerts  # a monitor.AlertLog: checked after each batch and when idle
        self.wake = threading.Event()  # set by the API after an upload
        self.processed = 0

    @property
    def scorer(self) -> Scorer:
        s = self._scorer
        return s.scorer if hasattr(s, "scorer") else s

    def run_once(self) -> int:
        """Claim up to `batch_size` jobs and finish them. Returns how many were claimed."""
        claimed = self.store.claim(self.owner, self.lease_s, self.batch_size)
        if not claimed:
            return 0
        data: list[bytes] = []
        ready: list[tuple[Any, Any]] = []
        for job, study in claimed:
            try:
                data.append(self.store.blobs.read(study.content_sha256))
                ready.append((job, study))
            except OSError:
                log.error("blob missing for study %s", study.id)
                self._finish_failed(job, "blob_missing", "The stored upload could not be read.")
        if ready:
            scorer = self.scorer  # one model for the whole batch, even if it switches meanwhile
            try:
                limits = [self._population_limit(scorer, study.clinic_id) for _, study in ready]
                results = scorer.score_many(data, [study.id for _, study in ready], limits)
            except Exception as exc:  # an unexpected error: retry later, never lose the job
                log.exception("scoring failed")
                for job, _ in ready:
                    self._retry(job, "worker_error", f"Scoring raised {type(exc).__name__}.")
                return len(claimed)
            for (job, study), result in zip(ready, results, strict=True):
                try:
                    self._store(job, study, result)
                except Exception:  # StoreBusy and the like: this job's lease will expire and
                    # it will be claimed again; the other jobs of the batch are still stored
                    log.exception("storing the result of study %s failed", study.id)
            self._check_alerts(force=False)
        return len(claimed)

    def _check_alerts(self, force: bool) -> None:
        if self.alerts is None:
            return
        try:
            self.alerts.check(force=force)
        except Exception:  # monitoring must never stop scoring
            log.exception("population monitoring check failed")

    def _population_limit(self, scorer: Scorer, clinic: str) -> float | None:
        """The site's own population-check threshold for this model file, if it has one."""
        population = getattr(scorer, "population", None)
        if population is None or population.check is None:
            return None
        profile = self.store.site_profile(scorer.model.sha256, clinic)
        return profile.population_threshold if profile is not None else None

    def _store(self, job: Any, study: Any, result: ScoreResult) -> None:
        doc = result.as_dict()
        findings = doc.pop("findings")
        profile = (
            self.store.site_profile(result.model_sha256, study.clinic_id) if findings else None
        )
        rows = [
            {
                "label": f["label"],
                "probability": f["probability"],
                "threshold": f["threshold"],
                "positive": f["positive"],
                "heatmap": f["heatmap"],
                "logit": f["logit"],
                "profile_id": None,
                "model_sha256": result.model_sha256,
                "model_version": result.model_version,
                "preprocess_version": result.preprocess_version,
                "provider": result.provider,
            }
            for f in findings
        ]
        if profile is not None:  # this site's own calibration and operating points
            for row in rows:
                label = row["label"]
                if row["positive"] is None:  # no call (outside the population): none now either
                    continue
                if label in profile.temperatures and row["logit"] is not None:
                    z = max(-60.0, min(60.0, row["logit"] / profile.temperatures[label]))
                    row["probability"] = 1.0 / (1.0 + math.exp(-z))
                    row["threshold"] = float(profile.thresholds[label])
                    row["positive"] = row["probability"] >= row["threshold"]
                    row["profile_id"] = profile.id
            doc["site_profile"] = profile.id
        try:
            if result.status == "failed" and result.code not in PERMANENT:
                self._retry(job, result.code or "worker_error", result.message or "")
                return
            self.store.complete(
                job.id,
                self.owner,
                job.attempts,
                status=result.status,
                result=doc,
                findings=rows,
                code=result.code,
                message=result.message,
                flag=result.flags[0] if result.status == "scored" and result.flags else None,
            )
            self.processed += 1
            log.info(
                "study %s %s%s in %.0f ms",
                study.id,
                result.status,
                f" ({result.code})" if result.code else "",
                result.timing_ms.get("total", 0.0),
            )
            if self.on_result is not None:
                self.on_result(result)
        except LeaseLost:
            log.warning("lease on study %s lost to another worker: result dropped", study.id)

    def _retry(self, job: Any, code: str, message: str) -> None:
        try:
            state = self.store.retry_later(
                job.id, self.owner, job.attempts, code, message, self.retry_delay_s
            )
            log.warning("job %s: %s, now %s", job.id, code, state)
        except LeaseLost:
            pass

    def _finish_failed(self, job: Any, code: str, message: str) -> None:
        with contextlib.suppress(LeaseLost):
            self.store.complete(
                job.id,
                self.owner,
                job.attempts,
                status="failed",
                result={"code": code},
                findings=[],
                code=code,
                message=message,
            )

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop` is set: work while there is work, then wait for a wake-up."""
        log.info("worker %s started", self.owner)
        busy = False
        while not stop.is_set():
            try:
                n = self.run_once()
            except StoreBusy:
                n = 0
            except Exception:
                log.exception("worker loop error")
                n = 0
            if n == 0:
                if busy:  # the queue just emptied: the day's shares are final for now
                    self._check_alerts(force=True)
                self.wake.wait(self.poll_s)
                self.wake.clear()
            busy = n > 0
        log.info("worker %s stopped", self.owner)


def start_thread(worker: Worker) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="scoring-worker", daemon=True)
    thread.start()
    return thread, stop
