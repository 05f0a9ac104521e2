"""Leased job processing: claim queued studies, run QC and the model on their images, store
each study's outcome (aggregated from its images, `aggregate.py`).

Runs in the API process (a thread) by default, or alone as `diagnostics worker`. Any number of
workers may share one database:

- a job is claimed with a lease (PostgreSQL: `FOR UPDATE SKIP LOCKED`);
- the outcome is stored only while the lease is still this worker's, in one transaction with
  the findings, so a job is never scored twice;
- after a crash, a job whose lease expired is claimed again; after `max_attempts` it is
  `failed`, visible to reviewers. No job is ever deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diagnostics.serve.aggregate import aggregate
from diagnostics.serve.runner import Scorer, ScoreResult, available_cores
from diagnostics.serve.store import LeaseLost, Store, StoreBusy

if TYPE_CHECKING:
    from diagnostics.serve.config import ServeConfig

# What ends the process on purpose; anything else raised while scoring is a failed batch.
PROCESS_EXITS = (KeyboardInterrupt, SystemExit, GeneratorExit)
log = logging.getLogger(__name__)

# Failures that another attempt cannot fix: the job ends at once.
PERMANENT = {"non_finite_output", "blob_missing", "processing_error"}


def worker_id() -> str:
    return f"{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def scoring_threads(configured: int, per_host: int, cores: int | None = None) -> int:
    """ONNX Runtime intra-op threads for one scoring process: `model.threads` when set (> 0);
    0 (ORT's own default: a thread per physical core) for the only worker of a machine; else
    its share of the cores, max(1, cores // per_host), for `per_host` workers sharing the
    machine. N workers each starting a thread per core would run N threads on every core,
    each waiting for the others at every operator."""
    if configured > 0:
        return configured
    if per_host <= 1:
        return 0
    return max(1, (available_cores() if cores is None else cores) // per_host)


def threads_rule(configured: int, per_host: int, cores: int | None = None) -> tuple[int, str]:
    """`scoring_threads`, and how it was chosen, in words for the log."""
    if configured > 0:
        return configured, f"model.threads {configured}"
    if per_host <= 1:
        return 0, "ONNX Runtime's default, a thread per physical core: 1 worker per host"
    cores = available_cores() if cores is None else cores
    threads = scoring_threads(0, per_host, cores)
    return threads, f"{cores} core{'' if cores == 1 else 's'} / {per_host} workers per host"


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
        # long-polls (GET /v1/studies/{id}?wait=) waiting for a study to be final: woken from
        # this thread through their event loop once its outcome is committed
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._waiters_lock = threading.Lock()

    def watch(self, study_id: str) -> asyncio.Event:
        """An event set (in the calling event loop) when this worker next stores an outcome
        of `study_id`. Call from a coroutine; `unwatch` when done."""
        event = asyncio.Event()
        with self._waiters_lock:
            self._waiters.setdefault(study_id, set()).add((asyncio.get_running_loop(), event))
        return event

    def unwatch(self, study_id: str, event: asyncio.Event) -> None:
        with self._waiters_lock:
            left = self._waiters.get(study_id)
            if left is None:
                return
            left.difference_update({w for w in left if w[1] is event})
            if not left:
                del self._waiters[study_id]

    def _notify(self, study_id: str) -> None:
        with self._waiters_lock:
            waiting = list(self._waiters.get(study_id, ()))
        for loop, event in waiting:
            with contextlib.suppress(RuntimeError):  # its loop has closed meanwhile
                loop.call_soon_threadsafe(event.set)

    @property
    def scorer(self) -> Scorer:
        s = self._scorer
        return s.scorer if hasattr(s, "scorer") else s

    def run_once(self) -> int:
        """Claim up to `batch_size` studies and finish them. Returns how many were claimed.
        All their images are scored in one call (batched by the Scorer), then each study's
        outcome is aggregated from its images (`aggregate.py`) and stored."""
        claimed = self.store.claim(self.owner, self.lease_s, self.batch_size)
        if not claimed:
            return 0
        ready: list[tuple[Any, Any, list[Any], list[bytes]]] = []
        held = self.store.instances_of([study.id for _, study in claimed])  # one read
        for job, study in claimed:
            images = [i for i in held.get(study.id, []) if i.status == "received"]
            try:
                data = [self.store.blobs.read(i.content_sha256) for i in images]
            except OSError:
                log.error("blob missing for study %s", study.id)
                self._finish_failed(
                    job, "blob_missing", "The stored upload could not be read.", images
                )
                continue
            if not images:
                self._finish_failed(job, "no_images", "The study holds no image to score.")
                continue
            ready.append((job, study, images, data))
        if ready:
            scorer = self.scorer  # one model for the whole batch, even if it switches meanwhile
            try:
                # each site's own calibration, operating points and population limit, if any:
                # the Scorer makes the calls (and so the heatmaps) under them
                profiles = {
                    study.clinic_id: self._profile(scorer, study.clinic_id)
                    for _, study, _, _ in ready
                }
                flat = [
                    (inst, d, profiles[study.clinic_id])
                    for _, study, images, data in ready
                    for inst, d in zip(images, data, strict=True)
                ]
                results = scorer.score_many(
                    [d for _, d, _ in flat],
                    [inst.id for inst, _, _ in flat],
                    [self._population_limit(scorer, prof) for _, _, prof in flat],
                    [prof for _, _, prof in flat],
                )
            except BaseException as exc:  # unexpected (a native decoder's panic is not an
                if isinstance(exc, PROCESS_EXITS):  # Exception): retry later, never lose the job
                    raise
                log.exception("scoring failed")
                for job, _, _, _ in ready:
                    self._retry(job, "worker_error", f"Scoring raised {type(exc).__name__}.")
                return len(claimed)
            at = 0
            done: list[tuple[Any, Any, list[tuple[Any, ScoreResult]], Any]] = []
            for job, study, images, _ in ready:
                mine = list(zip(images, results[at : at + len(images)], strict=True))
                at += len(images)
                try:
                    outcome = self._outcome(job, mine)
                except Exception:
                    log.exception("aggregating the result of study %s failed", study.id)
                    continue
                if outcome is not None:
                    done.append((job, study, mine, outcome))
            self._store_all(done)
            self._check_alerts(force=False)
        return len(claimed)

    def _store_all(self, done: list[tuple[Any, Any, list[tuple[Any, ScoreResult]], Any]]) -> None:
        """Store a batch's outcomes in one transaction (each fenced by its own lease); if that
        transaction fails, each on its own, so that one study's trouble costs only its own
        result (its lease expires and it is claimed again)."""
        if not done:
            return
        try:
            errors = self.store.complete_many(
                [self._complete_args(job, outcome) for job, _, _, outcome in done]
            )
        except Exception:  # StoreBusy and the like
            log.exception("storing a batch of %d results failed: one by one", len(done))
            for job, study, images, outcome in done:
                try:
                    self.store.complete(**self._complete_args(job, outcome))
                except LeaseLost:
                    self._lost(study)
                    continue
                except Exception:  # StoreBusy and the like: this job's lease will expire and
                    # it will be claimed again; the other jobs of the batch are still stored
                    log.exception("storing the result of study %s failed", study.id)
                    continue
                self._stored(study, images, outcome)
            return
        for (_, study, images, outcome), error in zip(done, errors, strict=True):
            if isinstance(error, LeaseLost):
                self._lost(study)
            elif error is not None:
                log.error("the result of study %s was not stored: %s", study.id, error)
            else:
                self._stored(study, images, outcome)

    def _check_alerts(self, force: bool) -> None:
        if self.alerts is None:
            return
        try:
            self.alerts.check(force=force)
        except Exception:  # monitoring must never stop scoring
            log.exception("population monitoring check failed")

    def _profile(self, scorer: Scorer, clinic: str) -> Any:
        """The site's newest profile for this model file, or None."""
        return self.store.site_profile(scorer.model.sha256, clinic)

    @staticmethod
    def _population_limit(scorer: Scorer, profile: Any) -> float | None:
        """The site's own population-check threshold for this model file, if it has one."""
        population = getattr(scorer, "population", None)
        if population is None or population.check is None or profile is None:
            return None
        return profile.population_threshold

    def _store(self, job: Any, study: Any, images: list[tuple[Any, ScoreResult]]) -> None:
        """Store one study's outcome (its own transaction)."""
        outcome = self._outcome(job, images)
        if outcome is None:
            return
        try:
            self.store.complete(**self._complete_args(job, outcome))
        except LeaseLost:
            self._lost(study)
            return
        self._stored(study, images, outcome)

    def _outcome(self, job: Any, images: list[tuple[Any, ScoreResult]]) -> Any:
        """The study's outcome, aggregated from its images; None when a transient failure of
        any image sent the study back to the queue (or it failed for good)."""
        for _, result in images:  # a transient failure of any image: the study again, later
            if result.status == "failed" and result.code not in PERMANENT:
                self._retry(job, result.code or "worker_error", result.message or "")
                return None
        rows = [
            [finding_row(f.model_dump(), result) for f in result.findings] for _, result in images
        ]
        return aggregate(images, rows)

    def _complete_args(self, job: Any, outcome: Any) -> dict[str, Any]:
        return {
            "job_id": job.id,
            "owner": self.owner,
            "attempt": job.attempts,
            "status": outcome.status,
            "result": outcome.result,
            "findings": outcome.findings,
            "code": outcome.code,
            "message": outcome.message,
            "flag": outcome.flag if outcome.status == "scored" else None,
            "images": outcome.images,
        }

    def _lost(self, study: Any) -> None:
        log.warning("lease on study %s lost to another worker: result dropped", study.id)

    def _stored(self, study: Any, images: list[tuple[Any, ScoreResult]], outcome: Any) -> None:
        self.processed += 1
        self._notify(study.id)
        total = sum(r.timing_ms.get("total", 0.0) for _, r in images)
        log.info(
            "study %s %s%s (%d image%s) in %.0f ms",
            study.id,
            outcome.status,
            f" ({outcome.code})" if outcome.code else "",
            len(images),
            "" if len(images) == 1 else "s",
            total,
        )
        if self.on_result is not None:
            for _, result in images:
                self.on_result(result)

    def _retry(self, job: Any, code: str, message: str) -> None:
        try:
            state = self.store.retry_later(
                job.id, self.owner, job.attempts, code, message, self.retry_delay_s
            )
            log.warning("job %s: %s, now %s", job.id, code, state)
        except LeaseLost:
            return
        if state == "failed":
            self._notify(job.study_id)

    def _finish_failed(self, job: Any, code: str, message: str, images: Any = ()) -> None:
        with contextlib.suppress(LeaseLost):
            self._complete_failed(job, code, message, images)
            self._notify(job.study_id)

    def _complete_failed(self, job: Any, code: str, message: str, images: Any) -> None:
        self.store.complete(
            job.id,
            self.owner,
            job.attempts,
            status="failed",
            result={"code": code},
            findings=[],
            code=code,
            message=message,
            images=[{"id": i.id, "status": "failed", "code": code, "result": {}} for i in images],
        )

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop` is set: work while there is work, then wait for a wake-up."""
        model = getattr(self.scorer, "model", None)
        threads = getattr(model, "threads", None)
        log.info(
            "worker %s started: ONNX Runtime intra-op threads %s",
            self.owner,
            threads or "default",
        )
        busy = False
        while not stop.is_set():
            try:
                n = self.run_once()
            except StoreBusy:
                n = 0
            except BaseException as exc:  # the loop outlives any one batch's failure
                if isinstance(exc, PROCESS_EXITS):
                    raise
                log.exception("worker loop error")
                n = 0
            if n == 0:
                if busy:  # the queue just emptied: the day's shares are final for now
                    self._check_alerts(force=True)
                self.wake.wait(self.poll_s)
                self.wake.clear()
            busy = n > 0
        log.info("worker %s stopped", self.owner)


def finding_row(f: dict[str, Any], result: ScoreResult) -> dict[str, Any]:
    """A finding as the Scorer made it (`Finding.model_dump()`), as the store keeps it: with
    the operating point it was judged by and the model that judged it."""
    point = f.get("operating_point") or {}
    return {
        "label": f["label"],
        "probability": f["probability"],
        "threshold": f["threshold"],
        "positive": f["positive"],
        "heatmap": f["heatmap"],
        "logit": f["logit"],
        "profile_id": point.get("profile_id"),
        "temperature": point.get("temperature"),
        "threshold_policy": (point.get("policy") or "")[:64] or None,
        "threshold_sensitivity": point.get("sensitivity"),
        "threshold_specificity": point.get("specificity"),
        "operating_point_source": point.get("source"),
        "model_sha256": result.model_sha256,
        "model_version": result.model_version,
        "preprocess_version": result.preprocess_version,
        "provider": result.provider,
        "precision": result.precision or None,  # int8 | fp32: the file that ran
    }


def worker_for(
    store: Store,
    holder: Any,
    cfg: ServeConfig,
    on_result: Callable[[ScoreResult], None] | None = None,
) -> Worker:
    """The worker a service config describes (in the API process or on its own)."""
    from diagnostics.serve.monitor import AlertLog

    return Worker(
        store,
        holder,
        lease_s=cfg.worker.lease_s,
        batch_size=cfg.model.batch_size,
        poll_s=cfg.worker.poll_s,
        retry_delay_s=cfg.worker.retry_delay_s,
        on_result=on_result,
        alerts=AlertLog(store, cfg.monitor),
    )


def start_thread(worker: Worker) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="scoring-worker", daemon=True)
    thread.start()
    return thread, stop
