"""Site profiles: a site's own temperatures and thresholds for one model file."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from diagnostics.serve.store.audit import AuditMixin
from diagnostics.serve.store.tables import SiteProfile


class ProfilesMixin(AuditMixin):
    def save_profile(self, **fields: Any) -> SiteProfile:
        def tx(s: Session) -> SiteProfile:
            row = SiteProfile(**fields)
            s.add(row)
            s.flush()
            self.audit(
                s,
                fields["created_by"],
                "profile.create",
                "site",
                fields["site"],
                profile=row.id,
                model_sha256=fields["model_sha256"],
            )
            return row

        return self.write(tx)

    def site_profile(self, model_sha256: str, site: str) -> SiteProfile | None:
        """The newest profile for this model file at this site, if any."""
        with self.session() as s:
            return s.scalar(
                select(SiteProfile)
                .where(SiteProfile.model_sha256 == model_sha256, SiteProfile.site == site)
                .order_by(SiteProfile.id.desc())
                .limit(1)
            )
