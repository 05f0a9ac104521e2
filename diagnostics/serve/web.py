"""The review page: server-rendered (Jinja2, autoescaped), Vietnamese and English.

Sign-in with an argon2-hashed password; the session lives in a signed cookie (Secure, HttpOnly,
SameSite=Lax); every form carries a per-session CSRF token. Reviews go through
`review.record_reviews`, the code path the API uses. Every study view and review is audited with
the model version shown, and whether an independent impression came first (a per-site option).
"""

from __future__ import annotations

import hmac
import io
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError

from diagnostics.serve.config import ServeConfig
from diagnostics.serve.i18n import ages_text, norm_lang, outside_reason, t
from diagnostics.serve.i18n import finding as finding_name
from diagnostics.serve.monitor import daily
from diagnostics.serve.reports import complete_operating_points, shown_model, stored_preprocessing
from diagnostics.serve.review import ReviewError, ReviewItem, record_reviews, review_labels
from diagnostics.serve.store import STATUSES, USERNAME, Store

PER_PAGE = 20


class WebDenied(Exception):
    """Not signed in (redirect to the sign-in page) or not allowed (403)."""

    def __init__(self, status: int, lang: str = "vi") -> None:
        super().__init__(status)
        self.status, self.lang = status, lang


def session_secret(data_dir: Path) -> str:
    """The cookie-signing secret: created once, atomically, readable by this user only."""
    path = data_dir / "session.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass  # another process made it: use theirs
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return path.read_text().strip()


def create_web_router(cfg: ServeConfig, store: Store, holder: Any, data_dir: Path) -> Any:
    """`holder`: the service's ModelHolder; its current model is read per request."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(
        loader=PackageLoader("diagnostics.serve", "templates"),
        autoescape=select_autoescape(["html"]),  # patient-supplied text is always escaped
    )
    router = APIRouter(prefix="/review")

    def lang_of(request: Request) -> str:
        return norm_lang(request.session.get("lang") or cfg.review.default_language)

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = secrets.token_urlsafe(24)
        return token

    async def form_checked(request: Request) -> Any:
        form = await request.form()
        sent = str(form.get("csrf", ""))
        expected = str(request.session.get("csrf", ""))
        if not sent or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise WebDenied(400, lang_of(request))
        return form

    def user(request: Request) -> Any:
        name = request.session.get("user")
        row = store.get_reviewer(name) if name else None
        if row is None:
            raise WebDenied(401, lang_of(request))
        return row

    def visible(row: Any) -> list[str] | None:
        return None if row.role == "admin" else list(row.scope or [])

    def render(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        lang = lang_of(request)
        html = env.get_template(template).render(
            lang=lang,
            t=lambda key, **v: t(lang, key, **v),
            fname=lambda label: finding_name(lang, label),
            csrf=csrf_token(request),
            me=request.session.get("user"),
            request_path=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            **ctx,
        )
        return HTMLResponse(html, status_code=status)

    # ----------------------------------------------------------------- sign-in, language

    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> HTMLResponse:
        return render(request, "login.html", error=None)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await form_checked(request)
        name, password = str(form.get("username", "")), str(form.get("password", ""))
        row = store.check_password(name, password) if USERNAME.fullmatch(name) else None
        if row is None:
            store.log_access("web", "user.login_failed", "user", name[:64].replace("\x00", ""))
            return render(
                request, "login.html", status=401, error=t(lang_of(request), "login_failed")
            )
        lang = lang_of(request)
        request.session.clear()  # a new session on sign-in (no fixation)
        request.session.update(user=row.username, lang=lang, csrf=secrets.token_urlsafe(24))
        store.log_access(f"user:{row.username}", "user.login", "user", row.username)
        return RedirectResponse("/review/", status_code=303)

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        await form_checked(request)
        lang = lang_of(request)
        request.session.clear()
        request.session["lang"] = lang
        return RedirectResponse("/review/login", status_code=303)

    @router.get("/lang/{lang}")
    def set_lang(request: Request, lang: str, next: str = "/review/") -> Response:
        request.session["lang"] = norm_lang(lang)
        target = next if next.startswith("/review") else "/review/"  # no open redirect
        return RedirectResponse(target, status_code=303)

    # ----------------------------------------------------------------- worklist

    @router.get("/", response_class=HTMLResponse)
    def worklist(
        request: Request,
        clinic: str = "",
        status: str = "",
        finding: str = "",
        sort: str = "triage",
        page: int = 1,
    ) -> HTMLResponse:
        row = user(request)
        page = min(max(1, page), 100_000)
        items, total = store.browse(
            visible(row),
            clinic=clinic or None,
            status=status if status in STATUSES else None,
            finding=finding or None,
            sort=sort,
            page=page,
            per_page=PER_PAGE,
        )
        pages = max(1, -(-total // PER_PAGE))
        clinics = visible(row) if row.role != "admin" else store.clinics()
        query = {"clinic": clinic, "status": status, "finding": finding, "sort": sort}
        store.log_access(f"user:{row.username}", "worklist.read", "worklist", row.username)
        return render(
            request,
            "worklist.html",
            items=items,
            total=total,
            page=page,
            pages=pages,
            clinics=clinics,
            statuses=STATUSES,
            findings=holder.model.labels,
            filters=query,
            page_url=lambda n: "/review/?" + urlencode({**query, "page": n}),
            admin=row.role == "admin",
            # sites that read before the AI: no AI flags on their worklist rows
            blind=set(cfg.review.independent_impression_clinics),
        )

    # ----------------------------------------------------------------- study

    def load_study(request: Request, study_id: str) -> tuple[Any, Any]:
        row = user(request)
        study = store.get_study(study_id)
        scope = visible(row)
        if study is None or (scope is not None and study.clinic_id not in scope):
            raise WebDenied(404, lang_of(request))
        return row, study

    def impression_pending(row: Any, study: Any) -> bool:
        if study.clinic_id not in cfg.review.independent_impression_clinics:
            return False
        return not any(
            a.action == "review.impression" and a.actor == f"user:{row.username}"
            for a in store.audit_rows(study.id)
        )

    @router.get("/studies/{study_id}", response_class=HTMLResponse)
    def study_page(request: Request, study_id: str, saved: int = 0) -> HTMLResponse:
        row, study = load_study(request, study_id)
        view = store.study_view(study_id)
        pending = impression_pending(row, study)
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
    async def impression(request: Request, study_id: str) -> Response:
        form = await form_checked(request)
        row, _ = load_study(request, study_id)
        text = str(form.get("impression", ""))[:4000]
        store.log_access(
            f"user:{row.username}", "review.impression", "study", study_id, impression=text
        )
        return RedirectResponse(f"/review/studies/{quote(study_id)}", status_code=303)

    @router.post("/studies/{study_id}/review")
    async def submit(request: Request, study_id: str) -> Response:
        form = await form_checked(request)
        row, study = load_study(request, study_id)
        if impression_pending(row, study):
            raise WebDenied(400, lang_of(request))
        view = store.study_view(study_id)
        try:
            items = _form_reviews(form, view)
        except ValidationError:
            raise WebDenied(400, lang_of(request)) from None
        if not items:
            return RedirectResponse(f"/review/studies/{quote(study_id)}", status_code=303)
        try:
            record_reviews(store, study, f"user:{row.username}", items)
        except ReviewError:
            raise WebDenied(400, lang_of(request)) from None
        return RedirectResponse(f"/review/studies/{quote(study_id)}?saved=1", status_code=303)

    def _form_reviews(form: Any, view: dict[str, Any]) -> list[ReviewItem]:
        items = []
        for f in view["findings"]:
            verdict = str(form.get(f"verdict_{f['id']}", ""))
            if verdict not in ("agree", "disagree", "uncertain"):
                continue  # a finding left without a decision is not reviewed
            items.append(
                ReviewItem(
                    finding_id=f["id"],
                    verdict=verdict,
                    corrected_label=str(form.get(f"corrected_{f['id']}", "")) or None,
                    note=str(form.get(f"note_{f['id']}", ""))[:4000],
                )
            )
        extra = str(form.get("unlisted_label", ""))
        if extra:
            items.append(
                ReviewItem(
                    unlisted=True,
                    corrected_label=extra,
                    note=str(form.get("unlisted_note", ""))[:4000],
                )
            )
        return items

    @router.get("/studies/{study_id}/image.png")
    def image(request: Request, study_id: str) -> Response:
        """The image as the model saw it (square, model size): heatmaps align with it."""
        from PIL import Image

        from diagnostics.imaging import ImageError, decode, resize_square

        _, study = load_study(request, study_id)
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
    def heatmap(request: Request, study_id: str, label: str) -> Response:
        from diagnostics.serve.runner import layer_path

        row, study = load_study(request, study_id)
        if impression_pending(row, study):  # no AI output before the reviewer's own reading
            raise WebDenied(404, lang_of(request))
        for f in store.study_view(study_id)["findings"]:
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

    # ----------------------------------------------------------------- agreement (admins)

    @router.get("/agreement", response_class=HTMLResponse)
    def agreement_page(request: Request) -> HTMLResponse:
        row = user(request)
        if row.role != "admin":
            raise WebDenied(403, lang_of(request))
        return render(
            request,
            "agreement.html",
            rows=store.agreement(None),
            monitor=daily(store, None, cfg.monitor),
            level=f"{100 * cfg.monitor.alert_share:.0f}%",
            min_studies=cfg.monitor.min_studies,
        )

    return router, env


def install(app: Any, cfg: ServeConfig, store: Store, holder: Any, data_dir: Path) -> None:
    """Mount the review page, its static files and its session middleware on `app`."""
    from fastapi.staticfiles import StaticFiles
    from starlette.middleware.sessions import SessionMiddleware

    router, env = create_web_router(cfg, store, holder, data_dir)
    app.include_router(router)
    app.mount(
        "/review/static",
        StaticFiles(directory=str(Path(__file__).with_name("static"))),
        name="review-static",
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(data_dir),
        session_cookie="review_session",
        max_age=int(cfg.review.session_hours * 3600),
        same_site="lax",
        https_only=cfg.review.secure_cookies,
    )

    @app.exception_handler(WebDenied)
    async def _denied(request: Request, exc: WebDenied) -> Response:
        if exc.status == 401:
            return RedirectResponse("/review/login", status_code=303)
        key = {400: "csrf_failed", 403: "forbidden", 404: "forbidden"}.get(exc.status, "forbidden")
        html = env.get_template("message.html").render(
            lang=exc.lang,
            t=lambda k, **v: t(exc.lang, k, **v),
            message=t(exc.lang, key),
            me=None,
            csrf="",
        )
        return HTMLResponse(html, status_code=exc.status)
