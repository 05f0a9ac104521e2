"""The append-only audit trail: every transition and every access is a row in `audit`."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from diagnostics.serve.store.base import StoreBase
from diagnostics.serve.store.engine import StoreFull
from diagnostics.serve.store.tables import Audit

log = logging.getLogger(__name__)
_GROUP_INIT = threading.Lock()


@dataclass
class _Pending:
    """One access row waiting for a group commit."""

    actor: str
    action: str
    object_type: str
    object_id: str
    detail: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    error: BaseException | None = None


class _GroupCommit:
    """Access rows from concurrent requests committed together: each caller returns only once
    its own row is committed (as durable as a transaction of its own), but while one commit is
    in flight the rows that arrive meanwhile wait and go in the next one, together. Under load
    this turns one write transaction (and one WAL fsync) per read request into one per batch."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards `pending`
        self.committing = threading.Lock()  # one committer (the leader) at a time
        self.pending: list[_Pending] = []
        self.batches = 0  # transactions written, for tests and metrics


class AuditMixin(StoreBase):
    @staticmethod
    def audit(
        s: Session, actor: str, action: str, object_type: str, object_id: str, **detail: Any
    ) -> None:
        s.add(
            Audit(
                actor=actor,
                action=action,
                object_type=object_type,
                object_id=str(object_id),
                detail=detail,
            )
        )

    def log_access(
        self, actor: str, action: str, object_type: str, object_id: str, **detail: Any
    ) -> None:
        """An audit row for an access, committed before this returns. Concurrent callers share
        one transaction (group commit, `_GroupCommit`). With the database full, the row goes to
        the log instead (generated IDs and codes only), so that reads and refusals keep
        working. A busy database (StoreBusy) raises, as a write of its own would."""
        group = self._audit_group()
        me = _Pending(actor, action, object_type, str(object_id), detail)
        with group.lock:
            group.pending.append(me)
        with group.committing:  # wait for the commit in flight, then lead the next one
            if not me.done:
                with group.lock:
                    batch, group.pending = group.pending, []
                self._commit_accesses(group, batch)
        if me.error is not None:
            raise me.error

    def _audit_group(self) -> _GroupCommit:
        group: _GroupCommit | None = self.__dict__.get("_access_group")
        if group is None:  # made on first use (no __init__ of its own in this mixin)
            with _GROUP_INIT:
                group = self.__dict__.setdefault("_access_group", _GroupCommit())
        assert group is not None
        return group

    def _commit_accesses(self, group: _GroupCommit, batch: list[_Pending]) -> None:
        def tx(s: Session) -> None:
            for p in batch:
                self.audit(s, p.actor, p.action, p.object_type, p.object_id, **p.detail)

        try:
            self.write(tx)
            group.batches += 1
        except StoreFull:
            for p in batch:
                log.error(
                    "audit row not written (database full): %s %s %s:%s",
                    p.actor,
                    p.action,
                    p.object_type,
                    p.object_id,
                )
        except BaseException as exc:  # each caller raises it, as with a transaction of its own
            for p in batch:
                p.error = exc
        finally:
            for p in batch:
                p.done = True

    def audit_rows(self, object_id: str | None = None) -> list[Audit]:
        q = select(Audit).order_by(Audit.id)
        if object_id is not None:
            q = q.where(Audit.object_id == object_id)
        with self.session() as s:
            return list(s.scalars(q))
