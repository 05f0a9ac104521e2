"""The store's tables (SQLAlchemy 2 declarative models) and the values their columns take.

Alembic (`diagnostics/serve/migrations`) builds and upgrades the schema from these models'
metadata (`Base.metadata`); `tests/test_serve_units.py` checks the two agree.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, ClassVar, overload

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# "received": a study still collecting its images (a DICOM study before its quiet period ends,
# or an HTTP study sent with complete=false); its job waits, not yet available.
STATUSES = ("received", "queued", "running", "scored", "failed_qc", "failed")
# An image of a study: waiting to be scored, scored, refused by QC (a lateral, say), failed, or
# arrived after its study was scored ("late": kept and shown, not scored).
INSTANCE_STATES = ("received", "scored", "failed_qc", "failed", "late")
SOURCES = ("http", "dicom", "stow")
# A result object bound for a PACS: pending (not yet sent, or waiting for its next attempt),
# sent, or failed (attempts spent, or a refusal no retry can fix). Never retried forever.
OUTBOX_STATES = ("pending", "sent", "failed")
FINAL = ("scored", "failed_qc", "failed")
ROLES = ("submitter", "reviewer", "admin")
CLINIC_CODE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
USERNAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,25}")  # "user:<name>" fits the 32-char actor


def now() -> datetime:
    return datetime.now(UTC)


@overload
def as_utc(dt: datetime) -> datetime: ...
@overload
def as_utc(dt: None) -> None: ...
def as_utc(dt: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every time here is UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Clinic(Base):
    __tablename__ = "clinics"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # short code, e.g. "hd-01"
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class ApiKey(Base):
    """Only a hash of the key is stored. A key reads `dk_<prefix>_<secret>`."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the whole key
    role: Mapped[str] = mapped_column(String(16))
    clinic_id: Mapped[str | None] = mapped_column(ForeignKey("clinics.id"), nullable=True)
    scope: Mapped[list[Any]] = mapped_column(default=list)  # reviewer: clinic IDs it may see
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    replaces: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("clinic_id", "content_sha256", name="uq_study_content"),
        UniqueConstraint("clinic_id", "sop_instance_uid", name="uq_study_sop_uid"),
        UniqueConstraint("clinic_id", "idempotency_key", name="uq_study_idempotency"),
        # one study per Study Instance UID and clinic (NULL: none, or an HTTP upload that made
        # a new study while an earlier one with that UID was already closed), kept by
        # `InstancesMixin.add_instance` under a lock
        Index("ix_studies_study_uid", "clinic_id", "study_instance_uid"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinics.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    content_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    original_filename: Mapped[str] = mapped_column(String(255), default="")  # metadata only
    sop_instance_uid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)  # QC, timing, model, code
    # Why a scored study carries no call, e.g. "outside_intended_population" (flagged, not
    # refused, as the site chose). NULL for an ordinary study.
    flag: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    # Revision 0006: a study is a set of images (`instances`). The columns above that describe
    # one file (content_sha256, size_bytes, format, original_filename, sop_instance_uid) are
    # its first image's. The DICOM Study Instance UID groups images; never logged or audited.
    # `last_instance_at`: when its newest image arrived; its job becomes available a quiet
    # period after that (or at once when it is marked complete).
    study_instance_uid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    source: Mapped[str] = mapped_column(String(8), default="http")  # SOURCES
    calling_ae: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_instance_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    instance_count: Mapped[int] = mapped_column(Integer, default=1)


class Instance(Base):
    """One image of a study, stored as received (content-addressed blob). De-duplicated per
    clinic by content and by SOP Instance UID: a re-sent instance is the same instance."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("clinic_id", "content_sha256", name="uq_instance_content"),
        UniqueConstraint("clinic_id", "sop_instance_uid", name="uq_instance_sop_uid"),
        Index("ix_instances_study", "study_id", "position"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"))
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinics.id"))
    position: Mapped[int] = mapped_column(Integer)  # 1, 2, ... in order of arrival
    status: Mapped[str] = mapped_column(String(16))  # INSTANCE_STATES
    code: Mapped[str | None] = mapped_column(String(64), nullable=True)  # refusal/failure code
    content_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    original_filename: Mapped[str] = mapped_column(String(255), default="")
    sop_instance_uid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    sop_class_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(128), nullable=True)
    view: Mapped[str | None] = mapped_column(String(16), nullable=True)  # ViewPosition tag
    source: Mapped[str] = mapped_column(String(8), default="http")
    # This image's own outcome (runner.ScoreResult.as_dict(), findings included)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class OutboxItem(Base):
    """One DICOM result object (an SR or a heatmap secondary capture) bound for a clinic's
    PACS. The file is written once, under `outbox/` in the data folder, before its row commits;
    sending it is retried with backoff up to `max_attempts`, then it stops as `failed`."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("study_id", "kind", "key", "route", name="uq_outbox_object"),
        Index("ix_outbox_due", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinics.id"))
    kind: Mapped[str] = mapped_column(String(16))  # "ai_sr" | "heatmap_sc" | "review_sr"
    key: Mapped[str] = mapped_column(String(64), default="")  # finding label, review ID...
    route: Mapped[str] = mapped_column(String(8))  # "cstore" | "stow"
    sop_instance_uid: Mapped[str] = mapped_column(String(128))  # the object's own UID
    file: Mapped[str] = mapped_column(String(255))  # name under <data>/outbox/
    state: Mapped[str] = mapped_column(String(16), default="pending")  # OUTBOX_STATES
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), unique=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    available_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    last_error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class FindingRow(Base):
    __tablename__ = "findings"
    __table_args__ = (UniqueConstraint("study_id", "label", name="uq_finding_label"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # None: no call made
    model_sha256: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    preprocess_version: Mapped[str | None] = mapped_column(String(16), nullable=True)
    provider: Mapped[str] = mapped_column(String(64))
    heatmap: Mapped[str | None] = mapped_column(String(255), nullable=True)  # file name
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    logit: Mapped[float | None] = mapped_column(Float, nullable=True)  # raw, before calibration
    profile_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # site profile used
    # The operating point the call was made at (contract.OperatingPoint), kept with the finding
    # so that it explains itself whatever model serves later. NULL in rows stored before
    # revision 0005: `operating_point_source` NULL means "not recorded".
    temperature: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold_policy: Mapped[str | None] = mapped_column(String(64), nullable=True)
    threshold_sensitivity: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold_specificity: Mapped[float | None] = mapped_column(Float, nullable=True)
    operating_point_source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Revision 0006: each scored image's part in this study-level finding (contract:
    # store.aggregate_findings): [{instance_id, position, probability, positive, heatmap}]
    images: Mapped[list[Any] | None] = mapped_column(nullable=True)
    # Revision 0008: the model file's precision that made it, "int8" or "fp32" (the clinic runs
    # a version's int8 twin where its accuracy gate passed). NULL in rows stored before.
    precision: Mapped[str | None] = mapped_column(String(8), nullable=True)


class SiteProfile(Base):
    """A site's own temperatures and thresholds for one model file (by sha256). The newest
    profile for (model, site) applies; older ones stay, for the record."""

    __tablename__ = "site_profiles"
    __table_args__ = (Index("ix_site_profiles_model_site", "model_sha256", "site"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    site: Mapped[str] = mapped_column(String(64))
    temperatures: Mapped[dict[str, Any]] = mapped_column()  # finding -> T
    thresholds: Mapped[dict[str, Any]] = mapped_column()  # finding -> threshold
    policy: Mapped[str] = mapped_column(String(64))
    evidence: Mapped[dict[str, Any]] = mapped_column()  # n, positives, before/after
    # The site's own threshold for the model's population check (None: the model's)
    population_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Revision 0007, risk models: the site's logistic recalibration is
    # logit' = logit / temperature + intercept (finding -> intercept; None for image models)
    intercepts: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


# A clinical record scored by a risk model: scored, or refused with a code (tables.REFUSAL_CODES:
# outside the intended population, an implausible value...) and never scored.
RISK_STATES = ("scored", "refused")
RISK_SOURCES = ("json", "fhir")


class RiskRecord(Base):
    """One clinical record scored (or refused) by a risk model at the clinic. The record as
    sent (features, any patient reference) is a content-addressed blob, like an image; this row
    holds only what the service made of it: no patient data."""

    __tablename__ = "risk_records"
    __table_args__ = (
        UniqueConstraint("clinic_id", "idempotency_key", name="uq_risk_idempotency"),
        Index("ix_risk_records_worklist", "clinic_id", "model", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    clinic_id: Mapped[str] = mapped_column(ForeignKey("clinics.id"))
    model: Mapped[str] = mapped_column(String(64))  # the service's name for it (`risk.models`)
    label: Mapped[str] = mapped_column(String(64))  # the predicted outcome, e.g. "dengue"
    source: Mapped[str] = mapped_column(String(8))  # RISK_SOURCES
    status: Mapped[str] = mapped_column(String(16), index=True)  # RISK_STATES
    content_sha256: Mapped[str] = mapped_column(String(64))  # the record as sent (blob)
    idempotency_key: Mapped[str | None] = mapped_column(String(140), nullable=True)
    # sha256 of (model, record as sent): a reused Idempotency-Key with another body is a 409
    fingerprint: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    raw_probability: Mapped[float | None] = mapped_column(Float, nullable=True)  # before profile
    category: Mapped[str | None] = mapped_column(String(16), nullable=True)  # high | low
    threshold: Mapped[float] = mapped_column(Float)
    imputed: Mapped[list[Any]] = mapped_column(default=list)  # features the model imputed
    code: Mapped[str | None] = mapped_column(String(64), nullable=True)  # refusal code
    reasons: Mapped[list[Any]] = mapped_column(default=list)  # refusal reasons, plain words
    model_name: Mapped[str] = mapped_column(String(128))  # the model file's own name
    model_sha256: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    profile_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # site profile used
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class RiskOutcome(Base):
    """The confirmed outcome of a risk record, recorded by a clinician later. Append-only: a
    new entry supersedes, never overwrites. `outcome` None: recorded as not known."""

    __tablename__ = "risk_outcomes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    record_id: Mapped[str] = mapped_column(ForeignKey("risk_records.id"), index=True)
    outcome: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    reviewer: Mapped[str] = mapped_column(String(32))  # API key ID or "user:<name>"
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Review(Base):
    """Append-only: a new review of the same finding supersedes, never overwrites."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # None: a finding the model does not list, named in corrected_label ("finding not listed")
    finding_id: Mapped[int | None] = mapped_column(
        ForeignKey("findings.id"), index=True, nullable=True
    )
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(32))  # API key ID or "user:<name>"
    verdict: Mapped[str] = mapped_column(String(16))
    corrected_label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Reviewer(Base):
    """A clinician who signs in to the review page. Passwords are argon2 hashes."""

    __tablename__ = "reviewers"
    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))  # reviewer | admin
    scope: Mapped[list[Any]] = mapped_column(default=list)  # clinics a reviewer may see
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Audit(Base):
    """Append-only record of uploads, accesses, scores, reviews and key changes."""

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, index=True)
    actor: Mapped[str] = mapped_column(String(64))  # key ID, "worker:<id>" or "cli"
    action: Mapped[str] = mapped_column(String(32))
    object_type: Mapped[str] = mapped_column(String(16))
    object_id: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
