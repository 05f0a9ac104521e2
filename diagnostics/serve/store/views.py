"""What the store's reads return: plain, JSON-ready dicts, typed here as TypedDicts.

These are the shapes the API, the review pages, FHIR reports, monitoring and the feedback export
read. Every key is always present (a value may be None), so the views are total; code that builds
a bigger dict from one (`{**study_summary(s), ...}`) or indexes one keeps working. Times are ISO
8601 strings in UTC.
"""

from __future__ import annotations

from typing import Any, TypedDict

from diagnostics.serve.store.tables import FindingRow, Review, SiteProfile, Study, as_utc


class StudySummary(TypedDict):
    """`study_summary`: one study, without its findings."""

    id: str
    clinic: str
    status: str  # one of STATUSES
    format: str
    filename: str | None  # kept only where a site turns it on
    size_bytes: int
    sha256: str
    created_at: str
    updated_at: str
    flag: str | None  # why a scored study carries no call
    source: str  # how its images came: http | dicom | stow
    instance_count: int  # its images (format, size and sha256 above are its first image's)


class ReviewView(TypedDict):
    """`review_dict`: one review of a finding (or of a finding the model does not list)."""

    id: int
    verdict: str
    corrected_label: str | None
    note: str
    reviewer: str  # API key ID or "user:<name>"
    created_at: str


class OperatingPointView(TypedDict):
    """`operating_point`: the operating point a finding was judged by."""

    recorded: bool  # stored with the finding (revision 0005 on)
    recovered_from: str | None  # "site_profile" when recovered for an older row
    source: str | None
    threshold: float
    temperature: float | None
    policy: str | None
    sensitivity: float | None
    specificity: float | None
    profile_id: int | None


class FindingView(TypedDict):
    """One finding of a `StudyView`, with its current review and the review history."""

    id: int
    label: str
    probability: float
    threshold: float
    positive: bool | None  # None: no call made
    heatmap: str | None
    model_sha256: str
    model_version: str | None
    preprocess_version: str | None
    provider: str
    precision: str | None  # int8 | fp32; None: stored before it was recorded
    site_profile: int | None
    images: list[dict[str, Any]]  # each scored image's part: instance_id, probability, ...
    operating_point: OperatingPointView
    review: ReviewView | None  # the latest
    review_history: list[ReviewView]  # latest first


class ImageView(TypedDict):
    """One image of a study. `status`: received | scored | failed_qc | failed | late."""

    id: str
    position: int
    status: str
    code: str | None  # why it was refused or failed (e.g. view_not_frontal)
    message: str | None
    view: str | None  # DICOM ViewPosition
    format: str
    source: str  # http | dicom | stow
    created_at: str


class StudyView(StudySummary):
    """`Store.study_view` (and each item of `Store.reviewed_studies`)."""

    attempts: int
    error_code: str | None
    result: dict[str, Any]  # QC, timing, model, code; `images`: each image's outcome
    images: list[ImageView]  # the study's images, in order of arrival
    findings: list[FindingView]
    unlisted: list[ReviewView]  # reviews naming a finding the model does not list


class WorklistItem(StudySummary):
    """`Store.worklist`: a scored study with an unreviewed finding, or a failed study (whose
    `any_positive` and `top_probability` are None)."""

    any_positive: bool | None
    top_probability: float | None


class BrowseItem(StudySummary):
    """One row of `Store.browse`, the review page's worklist."""

    positives: list[str]  # AI-positive findings, sorted
    top_probability: float | None
    reviewed: bool  # every listed finding has a review
    overdue: bool  # unreviewed past its clinic's maximum wait: at the top, whatever the AI said


class AgreementRow(TypedDict):
    """`Store.agreement`: per clinic, finding and model version, on each latest review."""

    clinic: str
    finding: str
    model_version: str | None
    model_sha256: str
    reviewed: int
    agreed: int
    disagreed: int
    uncertain: int
    share_agreed: float | None  # agreed / (agreed + disagreed); None when neither


class DailyOutcome(TypedDict):
    """`Store.daily_outcomes`: per clinic and UTC day."""

    clinic: str
    day: str  # YYYY-MM-DD
    studies: int  # finished
    scored: int
    refused: dict[str, int]  # QC refusals by code
    flagged: dict[str, int]  # scored with no call, by flag
    positive: int  # scored with an AI-positive call


def operating_point(f: FindingRow, profile: SiteProfile | None = None) -> OperatingPointView:
    """The operating point a finding was judged by, as stored with it (`recorded` True).

    A row stored before revision 0005 has only its threshold (`recorded` False). If a site
    profile judged it, that profile still says how its threshold was chosen and what it gave
    on the site's images (`recovered_from` "site_profile"); otherwise policy, sensitivity and
    specificity are None here (the caller may recover them from the very model file that
    scored it, by sha256, never from another)."""
    if f.operating_point_source is not None:
        return {
            "recorded": True,
            "recovered_from": None,
            "source": f.operating_point_source,
            "threshold": f.threshold,
            "temperature": f.temperature,
            "policy": f.threshold_policy,
            "sensitivity": f.threshold_sensitivity,
            "specificity": f.threshold_specificity,
            "profile_id": f.profile_id,
        }
    out: OperatingPointView = {
        "recorded": False,
        "recovered_from": None,
        "source": "site_profile" if f.profile_id is not None else None,
        "threshold": f.threshold,
        "temperature": None,
        "policy": None,
        "sensitivity": None,
        "specificity": None,
        "profile_id": f.profile_id,
    }
    evidence = (profile.evidence or {}).get(f.label) if profile is not None else None
    if profile is not None and f.label in (profile.temperatures or {}):
        after = (evidence or {}).get("after") or {}
        out["recovered_from"] = "site_profile"
        out["temperature"] = profile.temperatures[f.label]
        out["policy"] = (evidence or {}).get("policy") or profile.policy
        out["sensitivity"] = after.get("sensitivity")
        out["specificity"] = after.get("specificity")
    return out


def study_summary(study: Study) -> StudySummary:
    return {
        "id": study.id,
        "clinic": study.clinic_id,
        "status": study.status,
        "format": study.format,
        "filename": study.original_filename or None,  # kept only where a site turns it on
        "size_bytes": study.size_bytes,
        "sha256": study.content_sha256,
        "created_at": as_utc(study.created_at).isoformat(),
        "updated_at": as_utc(study.updated_at).isoformat(),
        "flag": study.flag,
        "source": study.source,
        "instance_count": study.instance_count,
    }


def review_dict(r: Review) -> ReviewView:
    return {
        "id": r.id,
        "verdict": r.verdict,
        "corrected_label": r.corrected_label,
        "note": r.note,
        "reviewer": r.reviewer,
        "created_at": as_utc(r.created_at).isoformat(),
    }
