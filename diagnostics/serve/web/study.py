"""One study: the page (findings, operating points, population), the reviewer's independent
impression where a site asks for one, the review form, the images and the heatmaps.

Each image of a study is served three ways: its pixels at full bit depth for the viewer's
window/level (uint16, at most 1024 px on the long side, with where the model's square lies on
it), the model's view as a PNG, and its heat layers (never before an independent impression).

Every view and review is audited with the model version shown, and whether an independent
impression came first. Reviews go through `review.record_reviews`, as the API's do."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from diagnostics.serve.api.deps import ConfigDep, DataDirDep, HolderDep, StoreDep
from diagnostics.serve.i18n import ages_text, image_status, outside_reason
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

MAX_SIDE = 1024  # the viewer's pixels: long side at most, in px
PRIVATE = {"Cache-Control": "private, max-age=300"}


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study_page(
    request: Request,
    study_id: str,
    cfg: ConfigDep,
    store: StoreDep,
    holder: HolderDep,
    saved: int = 0,
    image: str | None = None,
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
    images = _images(view, lang, pending)
    selected = next((i for i in images if i["id"] == image), None) or _default_image(view, images)
    return render(
        request,
        "study.html",
        view=view,
        study=study,
        images=images,
        selected=selected,
        heat_labels=_heat_labels(view, images),
        per_image=_per_image(view, images),
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


# --------------------------------------------------------------------------- the images


def _captions(images: list[dict[str, Any]]) -> dict[str, str]:
    """A short name per image: its view ("PA", "LL"), or its position; both where views repeat."""
    names = [i["view"] or f"#{i['position']}" for i in images]
    return {
        i["id"]: f"{i['position']} {n}" if names.count(n) > 1 else n
        for i, n in zip(images, names, strict=True)
    }


def _parts(f: dict[str, Any], view: dict[str, Any]) -> list[dict[str, Any]]:
    """A finding's part on each scored image; rows stored before per-image parts were belong
    to the study's one (first) image."""
    if f["images"] or not view["images"]:
        return list(f["images"])
    first = view["images"][0]
    return [
        {
            "instance_id": first["id"],
            "position": first["position"],
            "probability": f["probability"],
            "positive": f["positive"],
            "heatmap": f["heatmap"],
        }
    ]


def _layers(view: dict[str, Any], instance_id: str) -> dict[str, str]:
    """label -> heatmap file name, for the image's findings with a heat layer. Only where the
    study's call is positive (not for a negative or a no-call study), as the study's own."""
    out = {}
    for f in view["findings"]:
        for part in _parts(f, view):
            if f["positive"] and part["instance_id"] == instance_id and part["heatmap"]:
                out[f["label"]] = part["heatmap"]
    return out


def _images(view: dict[str, Any], lang: str, pending: bool) -> list[dict[str, Any]]:
    """The study's images for the page: caption, status in words, heat layers' labels."""
    captions = _captions(view["images"])
    return [
        {
            **i,
            "caption": captions[i["id"]],
            "status_text": image_status(lang, i["status"], i["code"], i["view"]),
            "heats": [] if pending else list(_layers(view, i["id"])),
        }
        for i in view["images"]
    ]


def _default_image(view: dict[str, Any], images: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The image the study's result came from, else the first scored, else the first."""
    primary = (view.get("result") or {}).get("primary_instance")
    return (
        next((i for i in images if i["id"] == primary), None)
        or next((i for i in images if i["status"] == "scored"), None)
        or (images[0] if images else None)
    )


def _heat_labels(view: dict[str, Any], images: list[dict[str, Any]]) -> list[str]:
    """Every label with a heat layer on some image, in the findings' order."""
    shown = {label for i in images for label in i["heats"]}
    return [f["label"] for f in view["findings"] if f["label"] in shown]


def _per_image(view: dict[str, Any], images: list[dict[str, Any]]) -> dict[int, str]:
    """finding id -> "PA 87% · LL —": each image's probability (— where it was not scored)."""
    if len(images) < 2:
        return {}

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.0f}%"

    out = {}
    for f in view["findings"]:
        probs = {p["instance_id"]: p["probability"] for p in _parts(f, view)}
        out[f["id"]] = " · ".join(f"{i['caption']} {pct(probs.get(i['id']))}" for i in images)
    return out


def _instance(request: Request, store: Store, study_id: str, instance_id: str) -> Any:
    """An image of this study (one `load_study` allowed); 404 for any other."""
    inst = store.get_instance(instance_id)
    if inst is None or inst.study_id != study_id:
        raise WebDenied(404, lang_of(request))
    return inst


def _decoded(request: Request, store: Store, sha256: str) -> Any:
    """The stored file's pixels, (H, W) float in [0, 1]; 404 where it does not decode."""
    from diagnostics.imaging import ImageError, decode

    try:
        return decode(store.blobs.read(sha256)).pixels
    except (ImageError, ValueError, OSError):  # e.g. an image that failed to decode
        raise WebDenied(404, lang_of(request)) from None


def _model_png(request: Request, store: Store, holder: Any, sha256: str, result: Any) -> Response:
    """The image as the scoring model prepared it (its stored preprocessing), so that its heat
    layers line up: square, model size, 8-bit grey."""
    from PIL import Image

    from diagnostics.imaging import resize_square

    spec, _ = stored_preprocessing(result, holder.model)
    try:
        pixels = resize_square(_decoded(request, store, sha256), spec)
    except ValueError:
        raise WebDenied(404, lang_of(request)) from None
    buf = io.BytesIO()
    Image.fromarray((pixels * 255).round().astype("uint8")).save(buf, "PNG")
    return Response(buf.getvalue(), media_type="image/png", headers=PRIVATE)


def _png_file(request: Request, path: Path) -> Response:
    """A heatmap's transparent layer (for the opacity control), else the overlay itself."""
    from diagnostics.serve.runner import layer_path

    if layer_path(path).is_file():
        path = layer_path(path)
    if not path.is_file():
        raise WebDenied(404, lang_of(request))
    return Response(path.read_bytes(), media_type="image/png", headers=PRIVATE)


def model_box(rows: int, cols: int, crop: str) -> tuple[float, float, float, float]:
    """Where the model's square lies on a rows x cols image, as fractions (x, y, w, h) of its
    width and height: `imaging.square` crops the centre, pads (letterbox; the box reaches past
    the image), or squashes the whole."""
    if rows == cols or crop == "squash":
        return 0.0, 0.0, 1.0, 1.0
    side = min(rows, cols) if crop == "center" else max(rows, cols)
    top, left = (rows - side) // 2, (cols - side) // 2  # negative for a letterbox's pad
    return left / cols, top / rows, side / cols, side / rows


def _downsample(pixels: Any, max_side: int) -> Any:
    """At most `max_side` on the long side, antialiased (Pillow's Lanczos on floats)."""
    import numpy as np
    from PIL import Image

    rows, cols = pixels.shape
    scale = max_side / max(rows, cols)
    if scale >= 1:
        return pixels
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    small = Image.fromarray(np.asarray(pixels, dtype=np.float32), mode="F").resize(
        size, Image.Resampling.LANCZOS
    )
    return np.clip(np.asarray(small), 0.0, 1.0)


@router.get("/studies/{study_id}/image.png")
def image(request: Request, study_id: str, store: StoreDep, holder: HolderDep) -> Response:
    """The study's first image as the model saw it (square, model size): heatmaps align."""
    _, study = load_study(request, store, study_id)
    return _model_png(request, store, holder, study.content_sha256, study.result)


@router.get("/studies/{study_id}/images/{instance_id}/image.png")
def instance_image(
    request: Request, study_id: str, instance_id: str, store: StoreDep, holder: HolderDep
) -> Response:
    """One image as the model saw it (square, model size): its heat layers align with it."""
    load_study(request, store, study_id)
    inst = _instance(request, store, study_id, instance_id)
    return _model_png(request, store, holder, inst.content_sha256, inst.result)


@router.get("/studies/{study_id}/images/{instance_id}/pixels")
def instance_pixels(
    request: Request, study_id: str, instance_id: str, store: StoreDep, holder: HolderDep
) -> Response:
    """One image for the viewer's window/level: uint16 little-endian, row by row (0 = black),
    at most MAX_SIDE px on its long side. `X-Rows`, `X-Columns`: its size; `X-Model-Box`: where
    the model's square, and so each heat layer, lies on it (x,y,w,h as fractions)."""
    import numpy as np

    load_study(request, store, study_id)
    inst = _instance(request, store, study_id, instance_id)
    full = _decoded(request, store, inst.content_sha256)
    small = _downsample(full, MAX_SIDE)
    spec, _ = stored_preprocessing(inst.result, holder.model)
    rows, cols = full.shape
    box = model_box(rows, cols, spec.crop)
    return Response(
        np.round(small * 65535).astype("<u2").tobytes(),
        media_type="application/octet-stream",
        headers={
            **PRIVATE,
            "X-Rows": str(small.shape[0]),
            "X-Columns": str(small.shape[1]),
            "X-Model-Box": ",".join(f"{v:.6f}" for v in box),
        },
    )


@router.get("/studies/{study_id}/images/{instance_id}/heatmaps/{label}.png")
def instance_heatmap(
    request: Request,
    study_id: str,
    instance_id: str,
    label: str,
    cfg: ConfigDep,
    store: StoreDep,
    data_dir: DataDirDep,
) -> Response:
    """One image's heat layer for a finding, at the model's view (see `X-Model-Box`)."""
    row, study = load_study(request, store, study_id)
    _instance(request, store, study_id, instance_id)
    if impression_pending(cfg, store, row, study):  # no AI output before the reviewer's reading
        raise WebDenied(404, lang_of(request))
    name = _layers(_view(request, store, study_id), instance_id).get(label)
    if name is None:
        raise WebDenied(404, lang_of(request))
    return _png_file(request, data_dir / "heatmaps" / name)


@router.get("/studies/{study_id}/heatmaps/{label}.png")
def heatmap(
    request: Request,
    study_id: str,
    label: str,
    cfg: ConfigDep,
    store: StoreDep,
    data_dir: DataDirDep,
) -> Response:
    row, study = load_study(request, store, study_id)
    if impression_pending(cfg, store, row, study):  # no AI output before the reviewer's reading
        raise WebDenied(404, lang_of(request))
    for f in _view(request, store, study_id)["findings"]:
        if f["label"] == label and f["heatmap"]:
            return _png_file(request, data_dir / "heatmaps" / f["heatmap"])
    raise WebDenied(404, lang_of(request))
