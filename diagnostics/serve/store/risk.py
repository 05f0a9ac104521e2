"""Risk records: clinical records scored (or refused) by a risk model at the clinic, and the
confirmed outcomes clinicians record later.

The record as sent is a content-addressed blob (written and fsynced before its row commits, as
an image is); the row holds what the service made of it. Outcomes are append-only: the newest
entry of a record is its outcome. Every write is audited in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime
from typing import Any, TypedDict

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from diagnostics.serve.store.audit import AuditMixin
from diagnostics.serve.store.tables import Clinic, RiskOutcome, RiskRecord, as_utc


class KeyReused(ValueError):
    """An Idempotency-Key this clinic used before, for another record or model (409)."""


class OutcomeView(TypedDict):
    value: bool | None  # True: the outcome was confirmed; False: ruled out; None: not known
    recorded_at: str
    by: str
    note: str


class RiskRecordView(TypedDict):
    """One risk record as the API, the review page and the FHIR builder read it."""

    id: str
    clinic: str
    model: str  # the service's name for the model
    label: str  # the predicted outcome, e.g. "dengue"
    source: str  # json | fhir
    status: str  # scored | refused
    probability: float | None  # after the site's recalibration, if any
    raw_probability: float | None  # the model's own
    category: str | None  # high | low
    threshold: float
    imputed: list[str]
    code: str | None  # refusal code
    reasons: list[str]
    model_name: str
    model_sha256: str
    model_version: str | None
    profile_id: int | None
    created_at: str
    outcome: OutcomeView | None


def risk_view(r: RiskRecord, outcome: RiskOutcome | None) -> RiskRecordView:
    return {
        "id": r.id,
        "clinic": r.clinic_id,
        "model": r.model,
        "label": r.label,
        "source": r.source,
        "status": r.status,
        "probability": r.probability,
        "raw_probability": r.raw_probability,
        "category": r.category,
        "threshold": r.threshold,
        "imputed": list(r.imputed or []),
        "code": r.code,
        "reasons": list(r.reasons or []),
        "model_name": r.model_name,
        "model_sha256": r.model_sha256,
        "model_version": r.model_version,
        "profile_id": r.profile_id,
        "created_at": as_utc(r.created_at).isoformat(),
        "outcome": None
        if outcome is None
        else {
            "value": outcome.outcome,
            "recorded_at": as_utc(outcome.created_at).isoformat(),
            "by": outcome.reviewer,
            "note": outcome.note,
        },
    }


class RiskMixin(AuditMixin):
    def add_risk_records(
        self, clinic: str, actor: str, items: list[dict[str, Any]]
    ) -> list[tuple[RiskRecordView, bool]]:
        """Store scored or refused records, each with its record as sent (`item["document"]`,
        JSON-ready) as a blob: [(view, created)]. An item whose `idempotency_key` this clinic
        has already used for the same model and record is not stored again: its first record
        is returned (created False); used for anything else, `KeyReused`. One transaction for
        all: either every record of a request is kept, or none."""
        blobs: list[str] = []
        prints: list[str] = []
        for item in items:  # durable before any row names it
            data = json.dumps(item["document"], sort_keys=True, allow_nan=False).encode()
            blobs.append(self._put_blob(data))
            prints.append(hashlib.sha256(item["model"].encode() + b"\0" + data).hexdigest())

        def tx(s: Session) -> list[tuple[RiskRecord, bool]]:
            if s.get(Clinic, clinic) is None:
                s.add(Clinic(id=clinic))
                s.flush()
            out: list[tuple[RiskRecord, bool]] = []
            for item, sha, fingerprint in zip(items, blobs, prints, strict=True):
                key = item.get("idempotency_key")
                if key is not None:
                    seen = s.scalar(
                        select(RiskRecord).where(
                            RiskRecord.clinic_id == clinic, RiskRecord.idempotency_key == key
                        )
                    )
                    if seen is not None and seen.fingerprint != fingerprint:
                        raise KeyReused(key)
                    if seen is not None:
                        out.append((seen, False))
                        continue
                row = RiskRecord(
                    id=uuid.uuid4().hex,
                    clinic_id=clinic,
                    content_sha256=sha,
                    fingerprint=fingerprint,
                    **{k: v for k, v in item.items() if k != "document"},
                )
                s.add(row)
                s.flush()
                self.audit(
                    s,
                    actor,
                    "risk.score" if row.status == "scored" else "risk.refused",
                    "risk",
                    row.id,
                    model=row.model,
                    model_sha256=row.model_sha256,
                    code=row.code,
                    profile=row.profile_id,
                )
                out.append((row, True))
            return out

        try:
            rows = self.write(tx)
        except IntegrityError:  # the same key sent twice at once: the other request won
            rows = self.write(tx)
        if any(not created for _, created in rows):
            self.log_access(actor, "risk.duplicate", "risk", rows[0][0].id, n=len(rows))
        return [(risk_view(r, self._outcome(r.id)), created) for r, created in rows]

    def _put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.blobs.path(sha).exists():
            temp = self.blobs.temp_file()
            try:
                temp.write_bytes(data)
                self.blobs.commit(temp, sha)
            finally:
                temp.unlink(missing_ok=True)
        return sha

    def _outcome(self, record_id: str) -> RiskOutcome | None:
        with self.session() as s:
            return s.scalar(
                select(RiskOutcome)
                .where(RiskOutcome.record_id == record_id)
                .order_by(RiskOutcome.id.desc())
                .limit(1)
            )

    def get_risk_record(self, record_id: str) -> RiskRecord | None:
        with self.session() as s:
            return s.get(RiskRecord, record_id)

    def risk_view(self, record_id: str) -> RiskRecordView | None:
        row = self.get_risk_record(record_id)
        return None if row is None else risk_view(row, self._outcome(record_id))

    def risk_document(self, record_id: str) -> dict[str, Any]:
        """The record as it was sent (features, any patient reference): never logged."""
        row = self.get_risk_record(record_id)
        if row is None:
            raise KeyError(record_id)
        doc: dict[str, Any] = json.loads(self.blobs.read(row.content_sha256))
        return doc

    def list_risk_records(
        self,
        clinics: list[str] | None,
        *,
        model: str | None = None,
        status: str | None = None,
        clinic: str | None = None,
        awaiting_outcome: bool = False,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[RiskRecordView]:
        """Newest first; high-risk records before low and refused ones among those awaiting an
        outcome (`awaiting_outcome`: records whose outcome nobody has recorded yet)."""
        latest = self._latest_outcomes()
        q = select(RiskRecord, RiskOutcome).outerjoin(latest, latest.c.record_id == RiskRecord.id)
        q = q.outerjoin(RiskOutcome, RiskOutcome.id == latest.c.id)
        if clinics is not None:
            q = q.where(RiskRecord.clinic_id.in_(clinics))
        if clinic:
            q = q.where(RiskRecord.clinic_id == clinic)
        if model:
            q = q.where(RiskRecord.model == model)
        if status:
            q = q.where(RiskRecord.status == status)
        if since is not None:
            q = q.where(RiskRecord.created_at >= since)
        if awaiting_outcome:
            q = q.where(RiskOutcome.id.is_(None), RiskRecord.status == "scored")
            q = q.order_by((RiskRecord.category == "high").desc())
        q = q.order_by(RiskRecord.created_at.desc(), RiskRecord.id).limit(limit)
        with self.session() as s:
            return [risk_view(r, o) for r, o in s.execute(q).all()]

    @staticmethod
    def _latest_outcomes() -> Any:
        return (
            select(RiskOutcome.record_id, func.max(RiskOutcome.id).label("id"))
            .group_by(RiskOutcome.record_id)
            .subquery()
        )

    def add_risk_outcome(
        self, record_id: str, reviewer: str, outcome: bool | None, note: str = ""
    ) -> RiskOutcome:
        """Append the confirmed outcome of a record (the newest entry is its outcome)."""

        def tx(s: Session) -> RiskOutcome:
            record = s.get(RiskRecord, record_id)
            if record is None:
                raise KeyError(record_id)
            row = RiskOutcome(record_id=record_id, outcome=outcome, reviewer=reviewer, note=note)
            s.add(row)
            s.flush()
            self.audit(
                s,
                reviewer,
                "risk.outcome",
                "risk",
                record_id,
                outcome=outcome,
                entry=row.id,
                model_sha256=record.model_sha256,
            )
            return row

        return self.write(tx)

    def risk_outcome_pairs(
        self, clinics: list[str] | None, model: str | None = None
    ) -> list[tuple[str, str, str, float, float, bool, str | None, int | None]]:
        """Scored records with a known outcome: (clinic, model, model_sha256, probability,
        raw_probability, outcome, category, profile_id), on each record's newest outcome."""
        latest = self._latest_outcomes()
        q = (
            select(
                RiskRecord.clinic_id,
                RiskRecord.model,
                RiskRecord.model_sha256,
                RiskRecord.probability,
                RiskRecord.raw_probability,
                RiskOutcome.outcome,
                RiskRecord.category,
                RiskRecord.profile_id,
            )
            .join(latest, latest.c.record_id == RiskRecord.id)
            .join(RiskOutcome, RiskOutcome.id == latest.c.id)
            .where(RiskRecord.status == "scored", RiskOutcome.outcome.is_not(None))
            .order_by(RiskRecord.created_at)
        )
        if clinics is not None:
            q = q.where(RiskRecord.clinic_id.in_(clinics))
        if model:
            q = q.where(RiskRecord.model == model)
        with self.session() as s:
            return [tuple(r) for r in s.execute(q).all()]  # type: ignore[misc]
