"""Turning one received file into an image of a study: the one path every way in shares (the
HTTP upload, the DICOM receiver, DICOMweb STOW-RS).

Format and header QC first, then de-duplication, then the blob (fsynced and renamed), then the
rows in one transaction: the instance, its study (found by Study Instance UID or made), the
study's job, and the audit. Only then is the sender told yes.

- A re-sent instance (same SOP Instance UID, or the same bytes) is the same instance: the
  answer is the first one's, nothing is stored twice. Over HTTP, other bytes under a SOP
  Instance UID already received conflict (409); over DICOM the first copy is kept, since a
  PACS may re-encode an instance it sends again.
- A study collects images while it is open (status `received`). Its job becomes available a
  quiet period after its newest image, or at once when it is marked complete. An image that
  comes after its study closed is kept as `late`: shown, never scored.
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass
from typing import Literal

from diagnostics.serve import qc
from diagnostics.serve.api.errors import Problem
from diagnostics.serve.config import ServeConfig
from diagnostics.serve.store import Conflict, Store, StoreFull
from diagnostics.serve.store.instances import NewImage
from diagnostics.serve.store.tables import Instance, Study
from diagnostics.serve.upload import ReceivedFile

Source = Literal["http", "dicom", "stow"]


@dataclass
class Intake:
    """What became of one received file."""

    study: Study
    instance: Instance
    created: bool  # False: this instance was received before (the answer is the first one's)
    late: bool = False  # it came after its study closed: kept, not scored


def ingest(
    cfg: ServeConfig,
    store: Store,
    got: ReceivedFile,
    *,
    clinic: str,
    actor: str,
    source: Source,
    idempotency_key: str | None = None,
    study_id: str | None = None,
    complete: bool | None = None,
    calling_ae: str | None = None,
) -> Intake:
    """Check `got` (a file already written to a temp path in the blob store), store it and
    make it an image of a study. Blocking: call from a thread.

    `study_id`: add to this open study (HTTP). `complete`: True scores the study at once
    (the HTTP default for a new study), False keeps it open for more images; None (DICOM,
    STOW) waits for the quiet period. Raises `Problem` with the HTTP status and a stable code
    for every refusal: 400/415/422 (bad input, QC), 409 (conflict, closed study), 507 (disk
    or database full), 503 (upload expired)."""
    from diagnostics.imaging import sniff_format

    if got.size == 0:
        raise Problem(400, "empty_file", "The file is empty (0 bytes).")
    fmt = sniff_format(got.head)
    if fmt is None:
        raise Problem(
            415,
            "unsupported_media_type",
            "The file is not DICOM (Part 10), PNG or JPEG, whatever its name or "
            "declared type says.",
        )
    # A single-image HTTP study is refused at once for a view the model does not read; an
    # image sent into a study (DICOM, STOW-RS, or an HTTP study left open) is kept and
    # refused per image when the study is scored: the study's other images still count.
    single = source == "http" and study_id is None and complete is not False
    try:
        info, _ = qc.check_intake(got.path.read_bytes(), cfg.qc, views=single)
    except qc.QCRefusal as exc:
        raise Problem(422, exc.code, exc.result.message) from None
    image = NewImage(
        sha256=got.sha256,
        size=got.size,
        fmt=fmt,
        filename=got.filename if cfg.privacy.store_filenames else "",
        sop_instance_uid=info.sop_instance_uid,
        study_instance_uid=info.study_instance_uid,
        series_instance_uid=info.series_instance_uid,
        sop_class_uid=info.sop_class_uid,
        view=str(info.dicom.get("ViewPosition") or "").strip().upper() or None,
    )
    if source == "http":
        existing = _http_existing(store, clinic, image, idempotency_key, study_id)
        if existing is not None:
            return existing
    else:
        hit = store.find_instance(clinic, got.sha256, info.sop_instance_uid)
        if hit is not None:  # the same instance again: the first copy stands
            study = store.get_study(hit.study_id)
            assert study is not None  # the foreign key
            return Intake(study, hit, created=False)
    created_blob = not store.blobs.path(got.sha256).exists()
    try:
        store.blobs.commit(got.path, got.sha256)  # durable before the rows commit
    except FileNotFoundError:  # its .part was taken for abandoned (held up over 2 minutes)
        raise Problem(
            503,
            "upload_expired",
            "The upload waited too long; send it again.",
            {"Retry-After": "5"},
        ) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise Problem(507, "insufficient_storage", "The service ran out of disk.") from None
        raise
    try:
        added = store.add_instance(
            image,
            clinic=clinic,
            actor=actor,
            source=source,
            quiet_s=cfg.studies.quiet_period_s,
            max_instances=cfg.studies.max_instances,
            max_attempts=cfg.worker.max_attempts,
            calling_ae=calling_ae,
            idempotency_key=idempotency_key,
            study_id=study_id,
            complete=True if single else complete,
        )
    except (Conflict, StoreFull) as exc:
        # the file this request stored goes too, unless an image holds the same bytes (decided
        # under the store's lock: a concurrent upload of them keeps it)
        if created_blob and not (isinstance(exc, Conflict) and exc.code == "upload_expired"):
            with contextlib.suppress(StoreFull):  # kept: a later upload of them reuses it
                store.remove_blob_if_unused(got.sha256)
        if isinstance(exc, Conflict):
            if exc.code == "upload_expired":
                raise Problem(
                    503, "upload_expired", conflict_text(exc.code), {"Retry-After": "5"}
                ) from None
            status = 404 if exc.code == "study_not_found" else 409
            raise Problem(status, exc.code, conflict_text(exc.code)) from None
        raise
    return Intake(added.study, added.instance, added.created, added.late)


def _http_existing(
    store: Store,
    clinic: str,
    image: NewImage,
    idempotency_key: str | None,
    study_id: str | None = None,
) -> Intake | None:
    """Over HTTP a retry names the same Idempotency-Key or instance: the same bytes answer
    with the first study; other bytes under either conflict (409)."""
    if idempotency_key:
        study = store.study_by_idempotency_key(clinic, idempotency_key)
        if study is not None:
            hit = store.find_instance(clinic, image.sha256, None)
            if hit is None or hit.study_id != study.id:
                raise Problem(
                    409, "idempotency_key_reused", conflict_text("idempotency_key_reused")
                )
            return Intake(study, hit, created=False)
    hit = store.find_instance(clinic, image.sha256, image.sop_instance_uid)
    if hit is None:
        return None
    if hit.content_sha256 != image.sha256:
        raise Problem(409, "sop_instance_conflict", conflict_text("sop_instance_conflict"))
    if study_id is not None and hit.study_id != study_id:
        code = "instance_in_other_study"
        raise Problem(409, code, conflict_text(code))
    study = store.get_study(hit.study_id)
    assert study is not None  # the foreign key
    return Intake(study, hit, created=False)


def conflict_text(code: str) -> str:
    return {
        "idempotency_key_reused": "This Idempotency-Key was used before with a different file.",
        "sop_instance_conflict": (
            "A different file with the same SOP Instance UID was already received from this clinic."
        ),
        "study_not_found": "No open study with that ID for this clinic.",
        "study_closed": "That study is complete (scored or being scored): start a new study.",
        "too_many_instances": "The study has reached its limit of images.",
        "instance_in_other_study": "This image was already received in another study.",
        "upload_expired": "The upload could not be kept; send it again.",
        "duplicate_upload": "The upload conflicts with an earlier one.",
    }.get(code, "The upload conflicts with an earlier one.")
