"""`Store`, the repository: every read and write the service makes, put together from one part
per area (each in its own module)."""

from __future__ import annotations

from diagnostics.serve.store.instances import InstancesMixin
from diagnostics.serve.store.jobs import JobsMixin
from diagnostics.serve.store.keys import KeysMixin
from diagnostics.serve.store.outbox import OutboxMixin
from diagnostics.serve.store.profiles import ProfilesMixin
from diagnostics.serve.store.reviewers import ReviewersMixin
from diagnostics.serve.store.reviews import ReviewsMixin
from diagnostics.serve.store.risk import RiskMixin


class Store(
    KeysMixin,
    ReviewsMixin,
    JobsMixin,
    ProfilesMixin,
    ReviewersMixin,
    InstancesMixin,
    OutboxMixin,
    RiskMixin,
):
    """The repository: every read and write the service makes.

    - base.StoreBase: engines, `session()` (reads), `write(fn)` (retried write transactions),
      the blob store, `migrate`, `ping`, `close`
    - audit.AuditMixin: `audit` (a row in the caller's transaction), `log_access`, `audit_rows`
    - keys.ClinicsMixin / KeysMixin: clinics; API keys (create, authenticate, revoke, rotate)
    - studies.StudiesMixin: upload, de-duplication, `study_view`, listing, `browse`
    - jobs.JobsMixin: leases (`claim`), outcomes (`complete`, `retry_later`), queue counts
    - reviews.ReviewsMixin: `worklist`, `add_reviews`, `agreement`, `daily_outcomes`,
      `reviewed_studies`
    - profiles.ProfilesMixin: site profiles
    - reviewers.ReviewersMixin: reviewer accounts for the review page
    - instances.InstancesMixin: the images of a study; adding one (grouped by Study Instance
      UID, de-duplicated), marking a study complete
    - outbox.OutboxMixin: DICOM result objects bound for a PACS, and their send state
    - risk.RiskMixin: clinical records scored by risk models, and their confirmed outcomes
    """
