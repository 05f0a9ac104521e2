"""The images of a study: adding one (grouped by Study Instance UID, de-duplicated by SOP
Instance UID and content), marking a study complete, and reading a study's images.

A study collects images while it is open (status `received`, its job queued but not yet
available). Each new image moves the job's `available_at` to a quiet period after it, so a
study is scored once its images stop coming (Orthanc's "stable study"), or at once when it is
marked complete. An image that comes after its study closed is kept as `late`: shown, never
scored, since its study's findings may have been reviewed already.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from diagnostics.serve.store.keys import ClinicsMixin
from diagnostics.serve.store.studies import Conflict
from diagnostics.serve.store.tables import Clinic, Instance, Job, Study, now


@dataclass(frozen=True)
class NewImage:
    """One received file, as the store records it (identifiers are never logged)."""

    sha256: str
    size: int
    fmt: str  # "dicom" | "png" | "jpeg"
    filename: str = ""
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_class_uid: str | None = None
    view: str | None = None  # ViewPosition, e.g. "PA", "LL"


@dataclass
class Added:
    study: Study
    instance: Instance
    created: bool  # False: the same instance came before; nothing was stored
    late: bool = False


class InstancesMixin(ClinicsMixin):
    def find_instance(self, clinic: str, sha256: str, sop_uid: str | None) -> Instance | None:
        """The instance with this SOP Instance UID, else with these bytes, in this clinic."""
        with self.session() as s:
            if sop_uid:
                hit = s.scalar(
                    select(Instance).where(
                        Instance.clinic_id == clinic, Instance.sop_instance_uid == sop_uid
                    )
                )
                if hit is not None:
                    return hit
            return s.scalar(
                select(Instance).where(
                    Instance.clinic_id == clinic, Instance.content_sha256 == sha256
                )
            )

    def add_instance(
        self,
        image: NewImage,
        *,
        clinic: str,
        actor: str,
        source: str,
        quiet_s: float,
        max_instances: int,
        max_attempts: int,
        calling_ae: str | None = None,
        idempotency_key: str | None = None,
        study_id: str | None = None,
        complete: bool | None = None,
        require_blob: bool = True,
    ) -> Added:
        """Store one image's rows in one transaction: the instance, its study (the one named,
        the one with its Study Instance UID, or a new one), the study's job, the audit.

        `complete`: True makes the study available to workers at once; False or None waits for
        the quiet period. A race with the same image (or another image of a new study) from a
        concurrent sender is retried once and resolves to the first.

        One write transaction in all (the clinic's row too, when it is new): no read
        transaction before it."""

        def tx(s: Session) -> Added:
            t = now()
            if s.get(Clinic, clinic) is None:  # a concurrent creation: IntegrityError, retried
                s.add(Clinic(id=clinic, name=clinic))
                s.flush()
            if self.dialect == "postgresql":  # SQLite: the write lock does all this
                # one study per UID (concurrent senders queue up), and a blob is never removed
                # by a refused upload while this one commits rows that need it
                lock_blob(s, image.sha256)
                if image.study_instance_uid:
                    key = f"{clinic}|{image.study_instance_uid}"
                    s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": key})
            if require_blob and not self.blobs.path(image.sha256).exists():
                # removed by a refused upload of the same bytes: this sender must send again
                raise Conflict("upload_expired")
            existing = _existing(s, clinic, image)
            if existing is not None:
                if study_id is not None and existing.study_id != study_id:
                    raise Conflict("instance_in_other_study")
                return Added(s.get_one(Study, existing.study_id), existing, False)
            study = _target_study(s, clinic, image, source, study_id)
            late = False
            if study is None and idempotency_key:  # the key names another upload's study
                taken = s.scalar(
                    select(Study.id).where(
                        Study.clinic_id == clinic, Study.idempotency_key == idempotency_key
                    )
                )
                if taken is not None:
                    raise Conflict("idempotency_key_reused")
            job: Job | None = None
            new = study is None
            if study is None:
                study = Study(
                    id=uuid.uuid4().hex,
                    clinic_id=clinic,
                    status="received",
                    content_sha256=image.sha256,
                    size_bytes=image.size,
                    format=image.fmt,
                    original_filename=image.filename,
                    sop_instance_uid=image.sop_instance_uid,
                    idempotency_key=idempotency_key,
                    study_instance_uid=_free_uid(s, clinic, image.study_instance_uid),
                    source=source,
                    calling_ae=calling_ae,
                    last_instance_at=t,
                    instance_count=0,
                    created_at=t,
                    updated_at=t,
                )
                s.add(study)
                s.flush()
                job = Job(
                    study_id=study.id,
                    status="queued",
                    max_attempts=max_attempts,
                    available_at=t + timedelta(seconds=quiet_s),
                )
                s.add(job)
                self.audit(s, actor, "study.upload", "study", study.id, source=source)
            elif study.instance_count >= max_instances:
                raise Conflict("too_many_instances")
            elif study.status in ("failed_qc", "failed"):
                # nothing of it was scored, so nothing was reviewed: a frontal image that comes
                # after a lateral alone (or after a failure) opens the study again
                self._reopen(s, study, actor, t, quiet_s)
            elif study.status not in ("received", "queued"):  # scored (or being scored)
                late = True
            position = (
                0  # a new study holds no image yet
                if new
                else int(
                    s.scalar(
                        select(func.coalesce(func.max(Instance.position), 0)).where(
                            Instance.study_id == study.id
                        )
                    )
                    or 0
                )
            )
            instance = Instance(
                id=uuid.uuid4().hex,
                study_id=study.id,
                clinic_id=clinic,
                position=position + 1,
                status="late" if late else "received",
                content_sha256=image.sha256,
                size_bytes=image.size,
                format=image.fmt,
                original_filename=image.filename,
                sop_instance_uid=image.sop_instance_uid,
                sop_class_uid=image.sop_class_uid,
                series_instance_uid=image.series_instance_uid,
                view=(image.view or None) and image.view[:16],
                source=source,
                result={},
                created_at=t,
            )
            s.add(instance)
            study.instance_count += 1
            study.updated_at = t
            if late:
                self.audit(s, actor, "instance.late", "study", study.id, size=image.size)
                return Added(study, instance, True, late=True)
            study.last_instance_at = t
            if job is None:
                job = s.scalar(select(Job).where(Job.study_id == study.id))
            if job is not None and job.status == "queued":
                if complete:
                    job.available_at = t
                    study.status = "queued"
                elif study.status == "received":  # open: the quiet period starts again
                    job.available_at = t + timedelta(seconds=quiet_s)
            self.audit(
                s,
                actor,
                "instance.received",
                "study",
                study.id,
                size=image.size,
                format=image.fmt,
                position=instance.position,
            )
            if complete:
                self.audit(s, actor, "study.queued", "study", study.id)
            return Added(study, instance, True)

        for attempt in range(2):
            try:
                return self.write(tx)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _reopen(self, s: Session, study: Study, actor: str, t: Any, quiet_s: float) -> None:
        """A study that failed (no image scored) takes a new image: back to collecting, its
        job fresh, its images scored again with the new one after the quiet period."""
        job = s.scalar(select(Job).where(Job.study_id == study.id).with_for_update())
        study.status, study.result, study.flag = "received", {}, None
        if job is not None:
            job.status, job.attempts = "queued", 0
            job.last_error_code = job.last_error = None
            job.available_at = t + timedelta(seconds=quiet_s)
            job.updated_at = t
        for inst in s.scalars(select(Instance).where(Instance.study_id == study.id)):
            if inst.status != "scored":
                inst.status, inst.code, inst.result = "received", None, {}
        self.audit(s, actor, "study.reopened", "study", study.id)

    def remove_blob_if_unused(self, sha256: str) -> bool:
        """Remove a blob no image or study holds (a refused upload's), decided under the same
        lock as `add_instance`, so a concurrent upload of the same bytes never loses it."""

        def tx(s: Session) -> bool:
            if self.dialect == "postgresql":
                lock_blob(s, sha256)
            for column, sha in (
                (Instance.id, Instance.content_sha256),
                (Study.id, Study.content_sha256),
            ):
                if s.scalar(select(column).where(sha == sha256).limit(1)) is not None:
                    return False
            self.blobs.remove(sha256)
            return True

        return self.write(tx)

    def create_study(
        self,
        *,
        clinic: str,
        actor: str,
        sha256: str,
        size: int,
        fmt: str,
        filename: str = "",
        sop_uid: str | None = None,
        idempotency_key: str | None = None,
        max_attempts: int = 3,
    ) -> tuple[Study, bool]:
        """A study of one image, scored at once (for tools and tests: its blob is not
        checked). (study, created)."""
        added = self.add_instance(
            NewImage(sha256, size, fmt, filename, sop_instance_uid=sop_uid),
            clinic=clinic,
            actor=actor,
            source="http",
            quiet_s=0.0,
            max_instances=1,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            complete=True,
            require_blob=False,
        )
        return added.study, added.created

    def complete_study(self, study_id: str, actor: str) -> Study:
        """Score an open study now, without waiting for its quiet period. A study already
        closed is returned as it is."""

        def tx(s: Session) -> Study:
            study = s.get_one(Study, study_id)
            if study.status != "received":
                return study
            job = s.scalar(select(Job).where(Job.study_id == study_id))
            t = now()
            if job is not None and job.status == "queued":
                job.available_at = t
            study.status = "queued"
            study.updated_at = t
            self.audit(s, actor, "study.queued", "study", study.id)
            return study

        return self.write(tx)

    def study_instances(self, study_id: str) -> list[Instance]:
        with self.session() as s:
            return list(
                s.scalars(
                    select(Instance)
                    .where(Instance.study_id == study_id)
                    .order_by(Instance.position)
                )
            )

    def instances_of(self, study_ids: list[str]) -> dict[str, list[Instance]]:
        """The images of several studies, in position order, in one read."""
        if not study_ids:
            return {}
        out: dict[str, list[Instance]] = {sid: [] for sid in study_ids}
        with self.session() as s:
            for inst in s.scalars(
                select(Instance)
                .where(Instance.study_id.in_(study_ids))
                .order_by(Instance.study_id, Instance.position)
            ):
                out[inst.study_id].append(inst)
        return out

    def dicom_uids(self, study_id: str) -> list[tuple[str, str]]:
        """("study", its Study Instance UID), then ("instance", SOP Instance UID) of each of its
        images that has one, for reports that go back to the HIS. Never logged."""
        with self.session() as s:
            study = s.get(Study, study_id)
            if study is None:
                return []
            sops = s.scalars(
                select(Instance.sop_instance_uid)
                .where(Instance.study_id == study_id, Instance.sop_instance_uid.is_not(None))
                .order_by(Instance.position)
            )
            head = [("study", study.study_instance_uid)] if study.study_instance_uid else []
            return head + [("instance", u) for u in sops if u]

    def get_instance(self, instance_id: str) -> Instance | None:
        with self.session() as s:
            return s.get(Instance, instance_id)


def lock_blob(s: Session, sha256: str) -> None:
    """PostgreSQL: a transaction lock on one blob's content hash."""
    s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"blob|{sha256}"})


def _existing(s: Session, clinic: str, image: NewImage) -> Instance | None:
    if image.sop_instance_uid:
        hit = s.scalar(
            select(Instance).where(
                Instance.clinic_id == clinic, Instance.sop_instance_uid == image.sop_instance_uid
            )
        )
        if hit is not None:
            return hit
    return s.scalar(
        select(Instance).where(
            Instance.clinic_id == clinic, Instance.content_sha256 == image.sha256
        )
    )


def _target_study(
    s: Session, clinic: str, image: NewImage, source: str, study_id: str | None
) -> Study | None:
    """The study this image joins, or None for a new one. Named (HTTP): it must be this
    clinic's and still open. By Study Instance UID: DICOM and STOW-RS always join (late if it
    closed); an HTTP upload joins only an open study, else it starts its own."""
    if study_id is not None:
        study = s.get(Study, study_id, with_for_update=True)
        if study is None or study.clinic_id != clinic:
            raise Conflict("study_not_found")
        if study.status != "received":
            raise Conflict("study_closed")
        return study
    if not image.study_instance_uid:
        return None
    study = s.scalar(
        select(Study)
        .where(Study.clinic_id == clinic, Study.study_instance_uid == image.study_instance_uid)
        .with_for_update()  # PostgreSQL: one writer per study (positions, counts, status)
    )
    if study is None:
        return None
    if source == "http" and study.status != "received":
        return None
    return study


def _free_uid(s: Session, clinic: str, uid: str | None) -> str | None:
    """The Study Instance UID for a new study, unless a closed study of this clinic holds it
    (an HTTP upload that starts its own study): then none."""
    if not uid:
        return None
    taken = s.scalar(
        select(Study.id).where(Study.clinic_id == clinic, Study.study_instance_uid == uid)
    )
    return None if taken else uid
