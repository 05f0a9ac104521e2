"""One study: the page (findings, operating points, population), the reviewer's independent
impression where a site asks for one, the review form, the image and the heatmaps.

Every view and review is audited with the model version shown, and whether an independent
impression came first. Reviews go through `review.record_reviews`, as the API's do."""

from __future__ import annotations

import io
from typing import Any, cast
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from diagnostics.serve.api.deps import ConfigDep, DataDirDep, HolderDep, StoreDep
from diagnostics.serve.i18n import ages_text, outside_reason
from diagnostics.serve.reports import complete_operating_points, shown_model, stored_preprocessing
from diagnostics.serve.review import ReviewError, ReviewItem, record_reviews, review_labels
from diagnostics.serve.store import Store
from diagnostics.serve.web.common import (
    WebDenied,
    form_checked,
    impression_pending,
    lang_of,
    load_study,
    render,
)

router = APIRouter(prefix="/review")


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study_page(
    request: Request,
    study_id: str,
    cfg: ConfigDep,
    store: StoreDep,
    holder: HolderDep,
    saved: int = 0,
) -> HTMLResponse:
    row, study = load_study(request, store, study_id)
    view = _view(request, store, study_id)
    pending = impression_pending(cfg, store, row, study)
    store.log_access(
        f"user:{row.username}",
        "study.view",
        "study",
        study_id,
        **shown_model(view),
        ai_shown=not pending,
        independent_impression=study.clinic_id in cfg.review.independent_impression_clinics,
    )
    # Each finding is explained by the operating point stored with it, never by the model
    # serving now; rows stored before that was recorded fall back to the very model file
    # that scored them (same sha256), or say that it is not known.
    model = holder.model
    complete_operating_points(view, model)
    _, preprocessing = stored_preprocessing(view.get("result"), model)
    same_model = (view.get("result") or {}).get("model_sha256") == model.sha256
    lang = lang_of(request)
    return render(
        request,
        "study.html",
        view=view,
        study=study,
        pending_impression=pending,
        saved=bool(saved),
        preprocessing_known=preprocessing != "current_model",
        # the intended population of the model serving now: shown for its own studies only
        population=model.metadata.population if same_model else None,
        ages=lambda a: ages_text(lang, a),
        no_call_reason=outside_reason(lang, (view.get("result") or {}).get("population") or {}),
        labels=review_labels([f["label"] for f in view["findings"]]),
        pct=lambda x: "—" if x is None else f"{100 * x:.1f}%",
    )


@router.post("/studies/{study_id}/impression")
async def impression(request: Request, study_id: str, store: StoreDep) -> Response:
    form = await form_checked(request)
    row, _ = load_study(request, store, study_id)
    try:
        text = _field(form, "impression").replace("\x00", "")[:4000]
    except ValueError:
        raise WebDenied(400, lang_of(request)) from None
    store.log_access(
        f"user:{row.username}", "review.impression", "study", study_id, impression=text
    )
    return RedirectResponse(f"/review/studies/{quote(study_id)}", status_code=303)


@router.post("/studies/{study_id}/review")
async def submit(request: Request, study_id: str, cfg: ConfigDep, store: StoreDep) -> Response:
    form = await form_checked(request)
    row, study = load_study(request, store, study_id)
    if impression_pending(cfg, store, row, study):
        raise WebDenied(400, lang_of(request))
    view = _view(request, store, study_id)
    try:
        items = _form_reviews(form, view)
    except ValueError:  # pydantic's ValidationError is one
        raise WebDenied(400, lang_of(request)) from None
    if not items:
        return RedirectResponse(f"/review/studies/{quote(study_id)}", status_code=303)
    try:
        record_reviews(store, study, f"user:{row.username}", items)
    except ReviewError:
        raise WebDenied(400, lang_of(request)) from None
    return RedirectResponse(f"/review/studies/{quote(study_id)}?saved=1", status_code=303)


def _view(request: Request, store: Store, study_id: str) -> dict[str, Any]:
    """The study with its findings (one `load_study` found; studies are never deleted)."""
    view = store.study_view(study_id)
    if view is None:
        raise WebDenied(404, lang_of(request))
    return cast(dict[str, Any], view)


def _field(form: Any, name: str) -> str:
    """A text field of the review form; a file sent in its place is refused (ValueError)."""
    value = form.get(name, "")
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text")
    return value


def _form_reviews(form: Any, view: dict[str, Any]) -> list[ReviewItem]:
    items = []
    for f in view["findings"]:
        verdict = _field(form, f"verdict_{f['id']}")
        if verdict not in ("agree", "disagree", "uncertain"):
            continue  # a finding left without a decision is not reviewed
        items.append(
            ReviewItem(
                finding_id=f["id"],
                verdict=verdict,
                corrected_label=_field(form, f"corrected_{f['id']}") or None,
                note=_field(form, f"note_{f['id']}")[:4000],
            )
        )
    extra = _field(form, "unlisted_label")
    if extra:
        items.append(
            ReviewItem(
                unlisted=True,
                corrected_label=extra,
                note=_field(form, "unlisted_note")[:4000],
            )
        )
    return items


@router.get("/studies/{study_id}/image.png")
def image(request: Request, study_id: str, store: StoreDep, holder: HolderDep) -> Response:
    """The image as the model saw it (square, model size): heatmaps align with it."""
    from PIL import Image

    from diagnostics.imaging import ImageError, decode, resize_square

    _, study = load_study(request, store, study_id)
    # as the scoring model prepared it (stored with the result), so heatmaps line up
    spec, _ = stored_preprocessing(study.result, holder.model)
    try:
        pixels = resize_square(decode(store.blobs.read(study.content_sha256)).pixels, spec)
    except (ImageError, ValueError, OSError):  # e.g. a study that failed to decode
        raise WebDenied(404, lang_of(request)) from None
    buf = io.BytesIO()
    Image.fromarray((pixels * 255).round().astype("uint8")).save(buf, "PNG")
    return Response(
        buf.getvalue(),
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=300"},
    )


@router.get("/studies/{study_id}/heatmaps/{label}.png")
def heatmap(
    request: Request,
    study_id: str,
    label: str,
    cfg: ConfigDep,
    store: StoreDep,
    data_dir: DataDirDep,
) -> Response:
    from diagnostics.serve.runner import layer_path

    row, study = load_study(request, store, study_id)
    if impression_pending(cfg, store, row, study):  # no AI output before the reviewer's reading
        raise WebDenied(404, lang_of(request))
    for f in _view(request, store, study_id)["findings"]:
        if f["label"] == label and f["heatmap"]:
            path = data_dir / "heatmaps" / f["heatmap"]
            if layer_path(path).is_file():  # the transparent layer, for the opacity control
                path = layer_path(path)
            if path.is_file():
                return Response(
                    path.read_bytes(),
                    media_type="image/png",
                    headers={"Cache-Control": "private, max-age=300"},
                )
    raise WebDenied(404, lang_of(request))
