"""Recording clinician reviews: the one code path the API and the review page share."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from diagnostics.serve.store import Store


class ReviewItem(BaseModel):
    """One finding's review; or, with `unlisted: true`, a finding the model does not list,
    named in `corrected_label`."""

    model_config = ConfigDict(extra="forbid")

    finding_id: int | None = None
    label: str | None = None
    unlisted: bool = False
    verdict: Literal["agree", "disagree", "uncertain"] = "agree"
    corrected_label: str | None = Field(None, max_length=64)
    note: str = Field("", max_length=4000)

    @field_validator("label", "corrected_label", "note")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # NUL is no text a reviewer types, and PostgreSQL refuses it in a text column
        if value is not None and "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


class ReviewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reviews: list[ReviewItem] = Field(min_length=1, max_length=100)


class ReviewError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def review_labels(listed: list[str]) -> list[str]:
    """What a correction may name: the harmonised vocabulary and the study's own findings."""
    from diagnostics.contract import FINDINGS

    return sorted(set(FINDINGS) | set(listed))


def record_reviews(store: Store, study: Any, actor: str, items: list[ReviewItem]) -> list[int]:
    """Validate and append reviews of a scored study; returns the new review IDs."""
    view = store.study_view(study.id)
    listed = [f["label"] for f in view["findings"]] if view is not None else []
    allowed_labels = review_labels(listed)
    if study.status != "scored":
        raise ReviewError(409, "not_scored", f"The study is {study.status}; nothing to review.")
    for item in items:
        if item.unlisted and not item.corrected_label:
            raise ReviewError(422, "invalid_request", "An unlisted finding needs corrected_label.")
        if not item.unlisted and item.finding_id is None and not item.label:
            raise ReviewError(422, "invalid_request", "Each review names a finding_id or label.")
        if item.corrected_label and item.corrected_label not in allowed_labels:
            raise ReviewError(
                422,
                "unknown_label",
                f"corrected_label must be one of {', '.join(allowed_labels)}.",
            )
    for item in items:
        if item.unlisted and item.corrected_label in listed:
            raise ReviewError(
                422,
                "finding_listed",
                f"{item.corrected_label} is a listed finding: review it there, not as unlisted.",
            )
    try:
        rows = store.add_reviews(study.id, actor, [i.model_dump() for i in items])
    except KeyError as exc:
        raise ReviewError(404, "finding_not_found", f"No finding {exc} in this study.") from None
    return [r.id for r in rows]
