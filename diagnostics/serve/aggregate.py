"""From the images of a study to the study's outcome and findings.

The rule (also in the README):

- Only images that were scored count. An image refused by QC (a lateral, a colour photograph)
  or failed keeps its own status and code, and the study is still scored from the others.
- A study is `scored` when at least one image was scored. Otherwise it takes the outcome of
  its first image: `failed_qc` with that image's code (e.g. `view_not_frontal` when it held
  only laterals), or `failed`.
- It is the same patient: when one image is refused as outside the intended population (a
  site that refuses), the whole study is refused with that code, whatever its other images.
- Per finding, the study's probability is the **highest** over its scored images, and the
  call is **positive when any image is positive** at its operating point: a finding seen on
  one view is in the study. The threshold, logit, operating point and heatmap are those of
  the image with that highest probability.
- When any scored image was flagged as outside the intended population (it is the same
  patient), the whole study is flagged: no call on any finding (`positive` None).
- Each finding keeps every scored image's part: `images` = [{instance_id, position,
  probability, positive, heatmap}].

For a study of one image this is exactly that image's outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diagnostics.serve.qc import OUTSIDE_POPULATION
from diagnostics.serve.runner import ScoreResult

RULE = "max probability over scored frontal images; positive if any image is positive"


@dataclass
class StudyOutcome:
    status: str  # scored | failed_qc | failed
    code: str | None
    message: str | None
    result: dict[str, Any]  # the study's result document
    findings: list[dict[str, Any]]  # rows for the store (worker.finding_row shape + images)
    flag: str | None
    images: list[dict[str, Any]] = field(default_factory=list)  # per instance: id, status, ...


def aggregate(
    images: list[tuple[Any, ScoreResult]], rows: list[list[dict[str, Any]]]
) -> StudyOutcome:
    """`images`: (instance, its ScoreResult) in the study's order; `rows`: each image's
    finding rows (as `worker.finding_row` makes them), in the same order."""
    updates = [
        {"id": inst.id, "status": res.status, "code": res.code, "result": _image_doc(res)}
        for inst, res in images
    ]
    scored = [
        (inst, res, r)
        for (inst, res), r in zip(images, rows, strict=True)
        if res.status == "scored"
    ]
    summary = [
        {
            "instance_id": inst.id,
            "position": inst.position,
            "view": inst.view,
            "status": res.status,
            "code": res.code,
            "message": res.message,
        }
        for inst, res in images
    ]
    # the same patient: one image refused as outside the intended population refuses the study
    outside = [res for _, res in images if res.code == OUTSIDE_POPULATION]
    if not scored or outside:
        first = outside[0] if outside else images[0][1]
        doc = {**first.as_dict(), "images": summary, "aggregation": RULE}
        doc.pop("findings", None)
        return StudyOutcome(first.status, first.code, first.message, doc, [], None, updates)

    flagged = [res for _, res, _ in scored if res.flags]
    flag = flagged[0].flags[0] if flagged else None
    by_label: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    for inst, _, image_rows in scored:
        for row in image_rows:
            by_label.setdefault(row["label"], []).append((inst, row))
    findings = []
    for parts in by_label.values():
        inst, top = max(parts, key=lambda p: p[1]["probability"])
        calls = [row["positive"] for _, row in parts]
        if flag is not None:
            positive: bool | None = None
        elif any(c is True for c in calls):
            positive = True
        elif all(c is None for c in calls):
            positive = None
        else:
            positive = False
        findings.append(
            {
                **top,
                "positive": positive,
                # a heatmap only where the study-level call is positive
                "heatmap": top["heatmap"] if positive else None,
                "images": [
                    {
                        "instance_id": i.id,
                        "position": i.position,
                        "probability": row["probability"],
                        "positive": None if flag is not None else row["positive"],
                        "heatmap": row["heatmap"],
                    }
                    for i, row in parts
                ],
            }
        )
    # the study's document is its most telling image's (a flagged one when the study is
    # flagged, so that its population and message explain the missing call; else the one with
    # the highest probability of any finding), with every image's summary beside it
    _, primary, _ = max(
        scored,
        key=lambda p: (
            bool(p[1].flags),
            max((row["probability"] for row in p[2]), default=0.0),
        ),
    )
    doc = primary.as_dict()
    doc.pop("findings", None)
    doc.update(
        images=summary,
        aggregation=RULE,
        primary_instance=next(inst.id for inst, res, _ in scored if res is primary),
        message=(primary.message if flag else None),
    )
    return StudyOutcome("scored", None, doc["message"], doc, findings, flag, updates)


def _image_doc(res: ScoreResult) -> dict[str, Any]:
    return res.as_dict()
