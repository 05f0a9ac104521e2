"""The append-only audit trail: every transition and every access is a row in `audit`."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from diagnostics.serve.store.base import StoreBase
from diagnostics.serve.store.engine import StoreFull
from diagnostics.serve.store.tables import Audit

log = logging.getLogger(__name__)


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
        """An audit row for an access. With the database full, the row goes to the log instead
        (generated IDs and codes only), so that reads and refusals keep working."""
        try:
            self.write(lambda s: self.audit(s, actor, action, object_type, object_id, **detail))
        except StoreFull:
            log.error(
                "audit row not written (database full): %s %s %s:%s",
                actor,
                action,
                object_type,
                object_id,
            )

    def audit_rows(self, object_id: str | None = None) -> list[Audit]:
        q = select(Audit).order_by(Audit.id)
        if object_id is not None:
            q = q.where(Audit.object_id == object_id)
        with self.session() as s:
            return list(s.scalars(q))
