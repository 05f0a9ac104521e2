"""Studies: lookup, the study view with its images, findings and reviews, listing, and the
review page's browse list. Adding images is `instances.InstancesMixin`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, and_, case, cast, func, literal, select

from diagnostics.serve.store.keys import ClinicsMixin
from diagnostics.serve.store.tables import (
    FindingRow,
    Instance,
    Job,
    Review,
    SiteProfile,
    Study,
    as_utc,
    now,
)
from diagnostics.serve.store.views import (
    BrowseItem,
    StudyView,
    operating_point,
    review_dict,
    study_summary,
)


class Conflict(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


# a date after every real one: sorts last ascending, on SQLite and PostgreSQL alike
_NEVER = datetime(9999, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class MaxWait:
    """How long an unreviewed study may wait before it goes to the top of the worklist,
    whatever the AI said (config `triage`): minutes, by default and per clinic."""

    minutes: float
    clinics: dict[str, float] = field(default_factory=dict)

    def overdue(self, at: datetime) -> Any:
        """SQL: this study has waited past its clinic's limit (since it arrived)."""
        cases = [
            (Study.clinic_id == c, Study.created_at < at - timedelta(minutes=m))
            for c, m in self.clinics.items()
        ]
        default = Study.created_at < at - timedelta(minutes=self.minutes)
        return case(*cases, else_=default) if cases else default


def triage_order(any_positive: Any, top: Any, overdue: Any = None) -> list[Any]:
    """Studies past their maximum wait first, longest waiting first, so that a study the AI
    called negative is never read last. Then AI-positive studies, then by the highest
    probability. A study with no call (its findings' `positive` NULL: outside the
    population) is not triaged: it ranks with the negatives, and its model output does not
    move it. Explicit, as NULLs sort first under DESC on PostgreSQL and last on SQLite."""
    first = (
        [
            case((overdue, 1), else_=0).desc(),
            case((overdue, Study.created_at), else_=_NEVER),
        ]
        if overdue is not None
        else []
    )
    return [
        *first,
        func.coalesce(any_positive, 0).desc(),
        case((Study.flag.is_not(None), 0.0), else_=func.coalesce(top, 0.0)).desc(),
    ]


class StudiesMixin(ClinicsMixin):
    def has_idempotency_key(self, clinic: str, key: str) -> bool:
        with self.session() as s:
            return (
                s.scalar(
                    select(Study.id).where(Study.clinic_id == clinic, Study.idempotency_key == key)
                )
                is not None
            )

    def study_by_idempotency_key(self, clinic: str, key: str) -> Study | None:
        with self.session() as s:
            return s.scalar(
                select(Study).where(Study.clinic_id == clinic, Study.idempotency_key == key)
            )

    def get_study(self, study_id: str) -> Study | None:
        with self.session() as s:
            return s.get(Study, study_id)

    def blob_in_use(self, sha256: str) -> bool:
        with self.session() as s:
            return any(
                s.scalar(select(column).where(sha == sha256).limit(1)) is not None
                for column, sha in (
                    (Instance.id, Instance.content_sha256),
                    (Study.id, Study.content_sha256),
                )
            )

    def study_view(self, study_id: str) -> StudyView | None:
        """A study with its findings, each with its reviews (latest first) and current verdict."""
        with self.session() as s:
            study = s.get(Study, study_id)
            if study is None:
                return None
            job = s.scalar(select(Job).where(Job.study_id == study_id))
            findings = list(
                s.scalars(
                    select(FindingRow)
                    .where(FindingRow.study_id == study_id)
                    .order_by(FindingRow.id)
                )
            )
            reviews = list(
                s.scalars(
                    select(Review).where(Review.study_id == study_id).order_by(Review.id.desc())
                )
            )
            images = list(
                s.scalars(
                    select(Instance)
                    .where(Instance.study_id == study_id)
                    .order_by(Instance.position)
                )
            )
            # rows stored before operating points were: their site profile still explains them
            legacy = {f.profile_id for f in findings if f.operating_point_source is None}
            legacy.discard(None)
            profiles: dict[int | None, SiteProfile] = {
                row.id: row
                for row in (
                    s.scalars(select(SiteProfile).where(SiteProfile.id.in_(legacy)))
                    if legacy
                    else []
                )
            }
        by_finding: dict[int | None, list[Review]] = {}
        for r in reviews:
            by_finding.setdefault(r.finding_id, []).append(r)
        return {
            **study_summary(study),
            "attempts": job.attempts if job else 0,
            "error_code": job.last_error_code if job else None,
            "result": study.result,
            "images": [
                {
                    "id": i.id,
                    "position": i.position,
                    "status": i.status,
                    "code": i.code,
                    "message": (i.result or {}).get("message"),
                    "view": i.view,
                    "format": i.format,
                    "source": i.source,
                    "created_at": as_utc(i.created_at).isoformat(),
                }
                for i in images
            ],
            "findings": [
                {
                    "id": f.id,
                    "label": f.label,
                    "probability": f.probability,
                    "threshold": f.threshold,
                    "positive": f.positive,
                    "heatmap": f.heatmap,
                    "model_sha256": f.model_sha256,
                    "model_version": f.model_version,
                    "preprocess_version": f.preprocess_version,
                    "provider": f.provider,
                    "precision": f.precision,
                    "site_profile": f.profile_id,
                    # each scored image's part (absent for rows stored before revision 0006)
                    "images": f.images or [],
                    "operating_point": operating_point(f, profiles.get(f.profile_id)),
                    "review": review_dict(by_finding[f.id][0]) if f.id in by_finding else None,
                    "review_history": [review_dict(r) for r in by_finding.get(f.id, [])],
                }
                for f in findings
            ],
            "unlisted": [review_dict(r) for r in by_finding.get(None, [])],
        }

    def list_studies(
        self,
        clinics: list[str] | None,
        *,
        status: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[Study]:
        q = select(Study).order_by(Study.created_at.desc()).limit(limit)
        if clinics is not None:
            q = q.where(Study.clinic_id.in_(clinics))
        if status:
            q = q.where(Study.status == status)
        if since is not None:
            q = q.where(Study.created_at >= since)
        with self.session() as s:
            return list(s.scalars(q))

    def status_counts(self) -> dict[str, int]:
        with self.session() as s:
            rows = s.execute(select(Study.status, func.count()).group_by(Study.status)).all()
        return {k: int(v) for k, v in rows}

    def browse(
        self,
        clinics: list[str] | None,
        *,
        clinic: str | None = None,
        status: str | None = None,
        finding: str | None = None,
        sort: str = "triage",
        page: int = 1,
        per_page: int = 20,
        max_wait: MaxWait | None = None,
    ) -> tuple[list[BrowseItem], int]:
        """The review page's worklist: filtered, sorted ("triage" = studies past `max_wait`
        unreviewed first, then AI-positive, then by probability, then oldest; "newest";
        "oldest"), one page. Returns (items, total)."""
        t = now()
        # unreviewed: a listed finding with no review (NOT IN over NULL would match nothing)
        unreviewed = (
            select(FindingRow.study_id)
            .where(
                FindingRow.id.not_in(
                    select(Review.finding_id).where(Review.finding_id.is_not(None))
                )
            )
            .scalar_subquery()
        )
        overdue = (
            and_(max_wait.overdue(t), Study.id.in_(unreviewed)) if max_wait is not None else None
        )
        agg = (
            select(
                FindingRow.study_id.label("sid"),
                func.max(cast(FindingRow.positive, Integer)).label("any_pos"),
                func.max(FindingRow.probability).label("top"),
            )
            .group_by(FindingRow.study_id)
            .subquery()
        )
        flag_overdue = overdue if overdue is not None else literal(False)
        q = select(Study, agg.c.any_pos, agg.c.top, flag_overdue.label("overdue")).outerjoin(
            agg, agg.c.sid == Study.id
        )
        if clinics is not None:
            q = q.where(Study.clinic_id.in_(clinics))
        if clinic:
            q = q.where(Study.clinic_id == clinic)
        if status:
            q = q.where(Study.status == status)
        if finding:
            q = q.where(
                Study.id.in_(
                    select(FindingRow.study_id).where(
                        FindingRow.label == finding, FindingRow.positive.is_(True)
                    )
                )
            )
        by_time: dict[str, list[Any]] = {
            "newest": [Study.created_at.desc(), Study.id],
            "oldest": [Study.created_at, Study.id],
        }
        order = by_time.get(
            sort,
            [
                *triage_order(agg.c.any_pos, agg.c.top, overdue),
                Study.created_at,
                Study.id,  # a total order: pages never repeat or skip a study
            ],
        )
        with self.session() as s:
            total = int(s.scalar(select(func.count()).select_from(q.subquery())) or 0)
            rows = s.execute(q.order_by(*order).offset((page - 1) * per_page).limit(per_page)).all()
            ids = [st.id for st, _, _, _ in rows]
            positives: dict[str, list[str]] = {}
            # reviewed = every listed finding has a review
            pending_ids = set(
                s.scalars(
                    select(FindingRow.study_id).where(
                        FindingRow.study_id.in_(ids),
                        FindingRow.id.not_in(
                            select(Review.finding_id).where(Review.finding_id.is_not(None))
                        ),
                    )
                )
            )
            scored = set(s.scalars(select(FindingRow.study_id).where(FindingRow.study_id.in_(ids))))
            reviewed = scored - pending_ids
            for sid, label in s.execute(
                select(FindingRow.study_id, FindingRow.label).where(
                    FindingRow.study_id.in_(ids), FindingRow.positive.is_(True)
                )
            ):
                positives.setdefault(sid, []).append(label)
        items: list[BrowseItem] = [
            {
                **study_summary(st),
                "positives": sorted(positives.get(st.id, [])),
                "top_probability": float(top) if top is not None else None,
                "reviewed": st.id in reviewed,
                "overdue": bool(late),
            }
            for st, _, top, late in rows
        ]
        return items, total
