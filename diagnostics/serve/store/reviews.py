"""Reviews: the worklist, appending reviews (never overwriting), and what reviews add up to:
agreement, daily outcomes for monitoring, and reviewed studies for the feedback export."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Integer, cast, func, select
from sqlalchemy.orm import Session

from diagnostics.serve.store.studies import MaxWait, StudiesMixin, triage_order
from diagnostics.serve.store.tables import FINAL, FindingRow, Job, Review, Study, as_utc, now
from diagnostics.serve.store.views import (
    AgreementRow,
    DailyOutcome,
    StudyView,
    WorklistItem,
    study_summary,
)


class ReviewsMixin(StudiesMixin):
    def worklist(
        self, clinics: list[str] | None, limit: int = 100, max_wait: MaxWait | None = None
    ) -> list[WorklistItem]:
        """Scored studies with a finding not yet reviewed, and failed ones: those past their
        maximum wait first (longest waiting first), then positives, then by highest
        probability, then oldest first."""
        overdue = max_wait.overdue(now()) if max_wait is not None else None
        with self.session() as s:
            # NOT IN over a NULL would match nothing: unlisted-finding reviews have no finding_id
            reviewed = select(Review.finding_id).where(Review.finding_id.is_not(None))
            pending = (
                select(
                    FindingRow.study_id,
                    func.max(cast(FindingRow.positive, Integer)).label("any_pos"),
                    func.max(FindingRow.probability).label("top"),
                )
                .where(FindingRow.id.not_in(reviewed))
                .group_by(FindingRow.study_id)
                .subquery()
            )
            q = (
                select(Study, pending.c.any_pos, pending.c.top)
                .join(pending, pending.c.study_id == Study.id)
                .where(Study.status == "scored")
                .order_by(
                    *triage_order(pending.c.any_pos, pending.c.top, overdue), Study.created_at
                )
                .limit(limit)
            )
            if clinics is not None:
                q = q.where(Study.clinic_id.in_(clinics))
            rows = s.execute(q).all()
            failed_q = select(Study).where(Study.status == "failed").order_by(Study.created_at)
            if clinics is not None:
                failed_q = failed_q.where(Study.clinic_id.in_(clinics))
            failed = list(s.scalars(failed_q.limit(limit)))
        out: list[WorklistItem] = [
            {**study_summary(st), "any_positive": bool(pos), "top_probability": float(top)}
            for st, pos, top in rows
        ]
        out += [
            {**study_summary(st), "any_positive": None, "top_probability": None} for st in failed
        ]
        return out

    def add_reviews(
        self, study_id: str, reviewer: str, items: list[dict[str, Any]]
    ) -> list[Review]:
        """Append reviews (never overwrite); audited with the model version that was shown."""
        with self.session() as s:
            shown = s.scalar(
                select(FindingRow.model_version).where(FindingRow.study_id == study_id).limit(1)
            )
        shown_model_version = shown

        def tx(s: Session) -> list[Review]:
            findings: dict[int | None, FindingRow] = {
                f.id: f
                for f in s.scalars(select(FindingRow).where(FindingRow.study_id == study_id))
            }
            by_label: dict[str | None, FindingRow] = {f.label: f for f in findings.values()}
            rows = []
            for item in items:
                if item.get("unlisted"):  # a finding the model does not report
                    row = Review(
                        finding_id=None,
                        study_id=study_id,
                        reviewer=reviewer,
                        verdict="agree",
                        corrected_label=item["corrected_label"],
                        note=item.get("note") or "",
                    )
                    s.add(row)
                    rows.append(row)
                    continue
                f = findings.get(item.get("finding_id")) or by_label.get(item.get("label"))
                if f is None:
                    raise KeyError(item.get("finding_id") or item.get("label"))
                row = Review(
                    finding_id=f.id,
                    study_id=study_id,
                    reviewer=reviewer,
                    verdict=item["verdict"],
                    corrected_label=item.get("corrected_label"),
                    note=item.get("note") or "",
                )
                s.add(row)
                rows.append(row)
            s.flush()
            for row in rows:
                self.audit(
                    s,
                    reviewer,
                    "review.create",
                    "study",
                    study_id,
                    finding=row.finding_id,
                    verdict=row.verdict,
                    review=row.id,
                    model_version=shown_model_version,
                )
            return rows

        return self.write(tx)

    def _latest_reviews(self, s: Session) -> Any:
        """Subquery: the latest review of each finding."""
        return (
            select(func.max(Review.id).label("id"))
            .where(Review.finding_id.is_not(None))
            .group_by(Review.finding_id)
            .subquery()
        )

    def agreement(self, clinics: list[str] | None) -> list[AgreementRow]:
        """Per clinic, finding and model version: reviewed AI findings and the share agreed,
        on each finding's latest review."""
        with self.session() as s:
            latest = self._latest_reviews(s)
            q = (
                select(
                    Study.clinic_id,
                    FindingRow.label,
                    FindingRow.model_version,
                    FindingRow.model_sha256,
                    func.count().label("reviewed"),
                    func.sum(cast(Review.verdict == "agree", Integer)).label("agreed"),
                    func.sum(cast(Review.verdict == "disagree", Integer)).label("disagreed"),
                )
                .join(latest, latest.c.id == Review.id)
                .join(FindingRow, FindingRow.id == Review.finding_id)
                .join(Study, Study.id == FindingRow.study_id)
                .where(FindingRow.positive.is_not(None))  # no call, nothing to agree with
                .group_by(
                    Study.clinic_id,
                    FindingRow.label,
                    FindingRow.model_version,
                    FindingRow.model_sha256,
                )
                .order_by(Study.clinic_id, FindingRow.label)
            )
            if clinics is not None:
                q = q.where(Study.clinic_id.in_(clinics))
            rows = s.execute(q).all()
        return [
            {
                "clinic": r.clinic_id,
                "finding": r.label,
                "model_version": r.model_version,
                "model_sha256": r.model_sha256,
                "reviewed": int(r.reviewed),
                "agreed": int(r.agreed or 0),
                "disagreed": int(r.disagreed or 0),
                "uncertain": int(r.reviewed) - int(r.agreed or 0) - int(r.disagreed or 0),
                # of the decided reviews: uncertain ones are neither agreement nor disagreement
                "share_agreed": (
                    int(r.agreed or 0) / (int(r.agreed or 0) + int(r.disagreed or 0))
                    if (r.agreed or r.disagreed)
                    else None
                ),
            }
            for r in rows
        ]

    def daily_outcomes(self, clinics: list[str] | None, since: datetime) -> list[DailyOutcome]:
        """Per clinic and UTC day since `since`: studies finished, refused by code, flagged, and
        scored with an AI-positive call. For monitoring (`serve.monitor`)."""
        with self.session() as s:
            q = (
                select(
                    Study.id,
                    Study.clinic_id,
                    Study.created_at,
                    Study.status,
                    Study.flag,
                    Job.last_error_code,
                )
                .join(Job, Job.study_id == Study.id)
                .where(Study.created_at >= since, Study.status.in_(FINAL))
            )
            if clinics is not None:
                q = q.where(Study.clinic_id.in_(clinics))
            rows = s.execute(q).all()
            positive = set(
                s.scalars(
                    select(FindingRow.study_id)
                    .join(Study, Study.id == FindingRow.study_id)
                    .where(Study.created_at >= since, FindingRow.positive.is_(True))
                )
            )
        days: dict[tuple[str, str], DailyOutcome] = {}
        for sid, clinic, created, status, flag, code in rows:
            day = as_utc(created).date().isoformat()
            d = days.setdefault(
                (clinic, day),
                {
                    "clinic": clinic,
                    "day": day,
                    "studies": 0,
                    "scored": 0,
                    "refused": {},
                    "flagged": {},
                    "positive": 0,
                },
            )
            d["studies"] += 1
            if status == "failed_qc" and code:
                d["refused"][code] = d["refused"].get(code, 0) + 1
            if status == "scored":
                d["scored"] += 1
                if flag:
                    d["flagged"][flag] = d["flagged"].get(flag, 0) + 1
                elif sid in positive:
                    d["positive"] += 1
        return [days[k] for k in sorted(days)]

    def reviewed_studies(
        self, *, since: datetime | None = None, clinic: str | None = None
    ) -> list[StudyView]:
        """Scored studies with at least one review, as study views (QC failures excluded)."""
        with self.session() as s:
            q = (
                select(Study.id)
                .where(Study.status == "scored")
                .where(Study.id.in_(select(Review.study_id)))
                .order_by(Study.created_at)
            )
            if since is not None:
                q = q.where(Study.created_at >= since)
            if clinic is not None:
                q = q.where(Study.clinic_id == clinic)
            ids = list(s.scalars(q))
        return [v for v in (self.study_view(i) for i in ids) if v is not None]
