"""The job queue: workers lease jobs (FOR UPDATE SKIP LOCKED on PostgreSQL, the write lock on
SQLite), and store each outcome fenced by that lease. Job states: received -> queued -> running
(lease) -> scored | failed_qc | failed."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from diagnostics.serve.store.audit import AuditMixin
from diagnostics.serve.store.tables import FINAL, FindingRow, Instance, Job, Study, now


class LeaseLost(Exception):
    """This worker no longer holds the job (its lease expired and another took it)."""


class JobsMixin(AuditMixin):
    def queue_depth(self) -> int:
        with self.session() as s:
            return int(  # a study still collecting images is not waiting for a worker yet
                s.scalar(
                    select(func.count())
                    .select_from(Job)
                    .join(Study, Study.id == Job.study_id)
                    .where(Job.status.in_(("queued", "running")), Study.status != "received")
                )
                or 0
            )

    def qc_refusal_counts(self) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(
                select(Job.last_error_code, func.count())
                .where(Job.status == "failed_qc")
                .group_by(Job.last_error_code)
            ).all()
        return {str(k): int(v) for k, v in rows}

    def claim(self, owner: str, lease_s: float, limit: int = 1) -> list[tuple[Job, Study]]:
        """Lease up to `limit` jobs: queued ones, and running ones whose lease expired (a worker
        died). PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the write lock. A reclaimed job past
        its attempts is failed instead, for reviewers to see."""

        def tx(s: Session) -> list[tuple[Job, Study]]:
            t = now()
            q = (
                select(Job)
                .where(
                    (
                        (Job.status == "queued")
                        | ((Job.status == "running") & (Job.lease_expires_at < t))
                    )
                    & (Job.available_at <= t)
                )
                .order_by(Job.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            out = []
            for job in s.scalars(q):
                study = s.get_one(Study, job.study_id)  # the foreign key: always there
                reclaimed = job.status == "running"
                if reclaimed and job.attempts >= job.max_attempts:
                    job.status = study.status = "failed"
                    job.last_error_code = "worker_lost"
                    job.last_error = (
                        f"The worker scoring this study stopped {job.attempts} times; "
                        "it was not retried again."
                    )
                    job.lease_owner, job.lease_expires_at = None, None
                    job.updated_at = study.updated_at = t
                    self.audit(
                        s, f"worker:{owner}", "study.failed", "study", study.id, code="worker_lost"
                    )
                    continue
                job.status = study.status = "running"
                job.attempts += 1
                job.lease_owner = owner
                job.lease_expires_at = t + timedelta(seconds=lease_s)
                job.updated_at = study.updated_at = t
                self.audit(
                    s,
                    f"worker:{owner}",
                    "study.reclaimed" if reclaimed else "study.running",
                    "study",
                    study.id,
                    attempt=job.attempts,
                )
                out.append((job, study))
            return out

        return self.write(tx)

    def _owned(self, s: Session, job_id: int, owner: str, attempt: int) -> tuple[Job, Study]:
        """The job, if this worker still holds its lease for this attempt; else LeaseLost."""
        job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or job.lease_owner != owner or job.attempts != attempt:
            raise LeaseLost(job_id)
        if job.status != "running":
            raise LeaseLost(job_id)
        return job, s.get_one(Study, job.study_id)

    def complete(
        self,
        job_id: int,
        owner: str,
        attempt: int,
        *,
        status: str,
        result: dict[str, Any],
        findings: list[dict[str, Any]],
        code: str | None = None,
        message: str | None = None,
        flag: str | None = None,
        images: list[dict[str, Any]] | None = None,
    ) -> None:
        """Store the outcome, findings and audit in one transaction, fenced by the lease
        (LeaseLost). `flag`: why a scored study carries no call (its findings have `positive`
        None). `images`: each scored image's own outcome ({id, status, code, result}). Images of
        the study that arrived while it was being scored are marked `late`."""
        (error,) = self.complete_many(
            [
                {
                    "job_id": job_id,
                    "owner": owner,
                    "attempt": attempt,
                    "status": status,
                    "result": result,
                    "findings": findings,
                    "code": code,
                    "message": message,
                    "flag": flag,
                    "images": images,
                }
            ]
        )
        if error is not None:
            raise error

    def complete_many(self, outcomes: list[dict[str, Any]]) -> list[BaseException | None]:
        """Several `complete` calls (each a dict of its keyword arguments, with `job_id`,
        `owner` and `attempt`) in one transaction: a worker's whole batch costs one commit
        instead of one per study. Each outcome is still fenced by its own lease: a lost lease
        (LeaseLost) or a non-finite score (ValueError) drops that outcome alone, and is
        returned in its place; None where stored. A failure of the transaction itself raises
        (nothing is stored; the caller may store the outcomes one by one)."""
        errors: list[BaseException | None] = [None] * len(outcomes)
        for i, o in enumerate(outcomes):
            try:
                _check_outcome(o["status"], o["findings"])
            except ValueError as exc:
                errors[i] = exc

        def tx(s: Session) -> list[BaseException | None]:
            out = list(errors)
            for i, o in enumerate(outcomes):
                if out[i] is not None:
                    continue
                try:  # _owned checks the lease before this outcome writes anything
                    self._store_outcome(s, **o)
                except LeaseLost as exc:
                    out[i] = exc
            return out

        return self.write(tx)

    def _store_outcome(
        self,
        s: Session,
        job_id: int,
        owner: str,
        attempt: int,
        *,
        status: str,
        result: dict[str, Any],
        findings: list[dict[str, Any]],
        code: str | None = None,
        message: str | None = None,
        flag: str | None = None,
        images: list[dict[str, Any]] | None = None,
    ) -> None:
        job, study = self._owned(s, job_id, owner, attempt)
        t = now()
        for f in findings:
            s.add(FindingRow(study_id=study.id, **f))
        job.status = study.status = status
        job.last_error_code, job.last_error = code, message
        job.lease_owner, job.lease_expires_at = None, None
        job.updated_at = study.updated_at = t
        study.result = result
        study.flag = flag
        outcomes = {u["id"]: u for u in images or []}
        for inst in s.scalars(select(Instance).where(Instance.study_id == study.id)):
            if inst.id in outcomes:
                u = outcomes[inst.id]
                inst.status, inst.code, inst.result = u["status"], u["code"], u["result"]
            elif inst.status == "received":
                inst.status = "late"
        action = {"scored": "study.scored", "failed_qc": "study.qc_refused"}.get(
            status, "study.failed"
        )
        detail = {"flag": flag} if flag else {}
        self.audit(s, f"worker:{owner}", action, "study", study.id, code=code, **detail)

    def retry_later(
        self, job_id: int, owner: str, attempt: int, code: str, message: str, delay_s: float
    ) -> str:
        """A transient failure: back to the queue, or `failed` once attempts are spent."""

        def tx(s: Session) -> str:
            job, study = self._owned(s, job_id, owner, attempt)
            t = now()
            job.last_error_code, job.last_error = code, message
            job.lease_owner, job.lease_expires_at = None, None
            job.updated_at = study.updated_at = t
            if job.attempts >= job.max_attempts:
                job.status = study.status = "failed"
                self.audit(s, f"worker:{owner}", "study.failed", "study", study.id, code=code)
            else:
                job.status = study.status = "queued"
                job.available_at = t + timedelta(seconds=delay_s)
                self.audit(s, f"worker:{owner}", "study.retry", "study", study.id, code=code)
            return job.status

        return self.write(tx)


def _check_outcome(status: str, findings: list[dict[str, Any]]) -> None:
    if status not in FINAL:
        raise ValueError(status)
    for f in findings:  # SQLite would store NaN as NULL, PostgreSQL as NaN: neither, ever
        if not math.isfinite(f["probability"]) or not math.isfinite(f["threshold"]):
            raise ValueError(f"non-finite score for {f['label']}: not stored")
