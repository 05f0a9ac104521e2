"""The outbox of DICOM results (SRs, heatmap secondary captures) bound for clinics' PACS.

One row per object and route (`cstore` | `stow`), unique on (study, kind, key, route), so
planning twice enqueues nothing twice. An object's file is written under `<data>/outbox/`
before its row commits (`dicom.export`). Sending is claimed (PostgreSQL: FOR UPDATE SKIP
LOCKED; SQLite: the write lock) by moving `next_attempt_at` past the send timeout, so two
exporters never send the same row at once. Failed attempts back off exponentially up to
`max_attempts`; then the row stops as `failed` until someone resends it. Every state change
is audited (kinds, keys and counts only: never a UID).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import CursorResult, String, cast, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from diagnostics.serve.store.audit import AuditMixin
from diagnostics.serve.store.tables import (
    OUTBOX_STATES,
    FindingRow,
    Instance,
    OutboxItem,
    Review,
    Study,
    now,
)

KINDS = ("ai_sr", "heatmap_sc", "review_sr")
ROUTES = ("cstore", "stow")


def backoff_delay(attempts: int, backoff_s: float, max_backoff_s: float) -> float:
    """Seconds before the next try after `attempts` failed ones: backoff * 2**(attempts-1),
    at most max_backoff."""
    return min(max_backoff_s, backoff_s * 2.0 ** max(0, attempts - 1))


class OutboxMixin(AuditMixin):
    # ------------------------------------------------------------------ enqueue

    def enqueue(
        self,
        *,
        study_id: str,
        clinic_id: str,
        kind: str,
        key: str,
        routes: Sequence[str],
        sop_instance_uid: str,
        file: str,
        max_attempts: int,
        actor: str = "exporter",
    ) -> int:
        """One pending row per route for an object already written to `file`. Idempotent:
        a route that already has its row is left alone. Returns the rows inserted."""
        if kind not in KINDS:
            raise ValueError(f"unknown outbox kind {kind!r}")
        bad = [r for r in routes if r not in ROUTES]
        if bad:
            raise ValueError(f"unknown outbox route {bad[0]!r}")
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert

        def tx(s: Session) -> int:
            t = now()
            added = 0
            for route in routes:
                stmt = (
                    insert(OutboxItem)
                    .values(
                        study_id=study_id,
                        clinic_id=clinic_id,
                        kind=kind,
                        key=key,
                        route=route,
                        sop_instance_uid=sop_instance_uid,
                        file=file,
                        state="pending",
                        attempts=0,
                        max_attempts=max_attempts,
                        next_attempt_at=t,
                        created_at=t,
                    )
                    .on_conflict_do_nothing(index_elements=["study_id", "kind", "key", "route"])
                )
                done: CursorResult[Any] = s.execute(stmt)  # type: ignore[assignment]
                if done.rowcount:
                    added += 1
                    self.audit(s, actor, "outbox.queued", "study", study_id, kind=kind, route=route)
            return added

        return self.write(tx)

    # ------------------------------------------------------------------ sending

    def due_outbox(self, limit: int = 20, *, claim_s: float = 60.0) -> list[OutboxItem]:
        """Pending rows whose time has come, oldest first, claimed for `claim_s`: their
        `next_attempt_at` moves that far ahead in the same transaction, so another exporter
        skips them until this one reports (or dies and the claim runs out)."""

        def tx(s: Session) -> list[OutboxItem]:
            t = now()
            q = (
                select(OutboxItem)
                .where(OutboxItem.state == "pending", OutboxItem.next_attempt_at <= t)
                .order_by(OutboxItem.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            items = list(s.scalars(q))
            for item in items:
                item.next_attempt_at = t + timedelta(seconds=claim_s)
            return items

        return self.write(tx)

    def mark_sent(self, item_id: int, *, actor: str = "exporter") -> bool:
        """The PACS took it. False when the row was not pending (a resend raced, say)."""

        def tx(s: Session) -> bool:
            item = s.get(OutboxItem, item_id, with_for_update=True)
            if item is None or item.state != "pending":
                return False
            item.attempts += 1
            item.state, item.sent_at = "sent", now()
            item.last_error = None  # the errors of earlier attempts are in the audit and log
            self.audit(
                s,
                actor,
                "outbox.sent",
                "study",
                item.study_id,
                kind=item.kind,
                route=item.route,
                attempts=item.attempts,
            )
            return True

        return self.write(tx)

    def mark_failed_attempt(
        self,
        item_id: int,
        error: str,
        *,
        permanent: bool,
        backoff_s: float,
        max_backoff_s: float,
        actor: str = "exporter",
    ) -> str | None:
        """Count a failed attempt. Permanent, or attempts spent: `failed` with `error`; else
        pending again after backoff * 2**(attempts-1) (at most max_backoff). Returns the new
        state (None: the row was not pending). `error` must hold no UID or patient data."""

        def tx(s: Session) -> str | None:
            item = s.get(OutboxItem, item_id, with_for_update=True)
            if item is None or item.state != "pending":
                return None
            t = now()
            item.attempts += 1
            item.last_error = error[:2000]
            if permanent or item.attempts >= item.max_attempts:
                item.state = "failed"
                item.next_attempt_at = t
                action = "outbox.failed"
            else:
                delay = backoff_delay(item.attempts, backoff_s, max_backoff_s)
                item.next_attempt_at = t + timedelta(seconds=delay)
                action = "outbox.retry"
            self.audit(
                s,
                actor,
                action,
                "study",
                item.study_id,
                kind=item.kind,
                route=item.route,
                attempts=item.attempts,
                permanent=permanent,
            )
            return item.state

        return self.write(tx)

    def resend(
        self,
        *,
        study_id: str | None = None,
        item_ids: Sequence[int] | None = None,
        actor: str = "cli",
    ) -> int:
        """Failed rows (of one study, or these IDs, or all) back to pending, attempts 0, due
        now. Returns how many."""

        def tx(s: Session) -> int:
            q = select(OutboxItem).where(OutboxItem.state == "failed")
            if study_id is not None:
                q = q.where(OutboxItem.study_id == study_id)
            if item_ids is not None:
                q = q.where(OutboxItem.id.in_(list(item_ids)))
            t = now()
            n = 0
            for item in s.scalars(q.with_for_update()):
                self.audit(
                    s,
                    actor,
                    "outbox.resend",
                    "study",
                    item.study_id,
                    kind=item.kind,
                    route=item.route,
                    attempts=item.attempts,
                )
                item.state, item.attempts, item.next_attempt_at = "pending", 0, t
                n += 1
            return n

        return self.write(tx)

    # ------------------------------------------------------------------ reads

    def outbox_items(
        self,
        study_id: str | None = None,
        state: str | None = None,
        limit: int = 100,
        *,
        kind: str | None = None,
    ) -> list[OutboxItem]:
        """Rows, newest first (of one study: in the order they were made)."""
        if state is not None and state not in OUTBOX_STATES:
            raise ValueError(f"unknown outbox state {state!r}; known: {', '.join(OUTBOX_STATES)}")
        q = select(OutboxItem)
        if study_id is not None:
            q = q.where(OutboxItem.study_id == study_id).order_by(OutboxItem.id)
        else:
            q = q.order_by(OutboxItem.id.desc())
        if state is not None:
            q = q.where(OutboxItem.state == state)
        if kind is not None:
            q = q.where(OutboxItem.kind == kind)
        with self.session() as s:
            return list(s.scalars(q.limit(limit)))

    def studies_needing_ai_sr(
        self, clinics: Sequence[str], limit: int = 20, exclude: Sequence[str] = ()
    ) -> list[str]:
        """Scored studies of these clinics (those with a destination) with findings and at
        least one scored DICOM image, and no `ai_sr` row yet: oldest first."""
        if not clinics:
            return []
        q = (
            select(Study.id)
            .where(
                Study.status == "scored",
                Study.clinic_id.in_(list(clinics)),
                Study.id.in_(select(FindingRow.study_id)),
                Study.id.in_(
                    select(Instance.study_id).where(
                        Instance.format == "dicom", Instance.status == "scored"
                    )
                ),
                Study.id.not_in(select(OutboxItem.study_id).where(OutboxItem.kind == "ai_sr")),
            )
            .order_by(Study.updated_at, Study.id)
            .limit(limit)
        )
        if exclude:
            q = q.where(Study.id.not_in(list(exclude)))
        with self.session() as s:
            return list(s.scalars(q))

    def studies_needing_review_sr(
        self, clinics: Sequence[str], limit: int = 20, exclude: Sequence[str] = ()
    ) -> list[tuple[str, int]]:
        """(study, latest review ID) of studies with an `ai_sr` row whose every finding has
        a review, and whose latest review (of any finding, or an unlisted one) has no
        `review_sr` row keyed by its ID yet: each later change of review makes another."""
        if not clinics:
            return []
        latest = (
            select(Review.study_id.label("sid"), func.max(Review.id).label("rid"))
            .group_by(Review.study_id)
            .subquery()
        )
        reviewed = select(Review.finding_id).where(Review.finding_id.is_not(None))
        unreviewed = select(FindingRow.study_id).where(FindingRow.id.not_in(reviewed))
        done = select(OutboxItem.study_id).where(
            OutboxItem.kind == "review_sr",
            OutboxItem.study_id == latest.c.sid,
            OutboxItem.key == cast(latest.c.rid, String),
        )
        q = (
            select(Study.id, latest.c.rid)
            .join(latest, latest.c.sid == Study.id)
            .where(
                Study.status == "scored",
                Study.clinic_id.in_(list(clinics)),
                Study.id.in_(select(FindingRow.study_id)),
                Study.id.not_in(unreviewed),
                Study.id.in_(select(OutboxItem.study_id).where(OutboxItem.kind == "ai_sr")),
                ~done.exists(),
            )
            .order_by(latest.c.rid)
            .limit(limit)
        )
        if exclude:
            q = q.where(Study.id.not_in(list(exclude)))
        with self.session() as s:
            return [(str(sid), int(rid)) for sid, rid in s.execute(q)]

    def outbox_counts(self) -> dict[str, int]:
        """Rows per state, for health and metrics."""
        with self.session() as s:
            rows = s.execute(
                select(OutboxItem.state, func.count()).group_by(OutboxItem.state)
            ).all()
        return {str(k): int(v) for k, v in rows}
