"""The review page: server-rendered (Jinja2, autoescaped), Vietnamese and English.

Sign-in with an argon2-hashed password; the session lives in a signed cookie (Secure, HttpOnly,
SameSite=Lax); every form carries a per-session CSRF token. Reviews go through
`review.record_reviews`, the code path the API uses. Every study view and review is audited with
the model version shown, and whether an independent impression came first (a per-site option).

One router per area: `session` (sign-in, language), `worklist`, `study` (page, impression,
review, image, heatmaps), `agreement` (admins), `risk` (the risk records a risk model scored
at the clinic: worklist, confirmed outcomes, agreement and calibration per site). Shared
helpers are in `common`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from diagnostics.serve.config import ServeConfig
from diagnostics.serve.i18n import t
from diagnostics.serve.web import agreement, risk, session, study, worklist
from diagnostics.serve.web.common import PER_PAGE, WebDenied, session_secret, templates

__all__ = ["PER_PAGE", "WebDenied", "create_web_router", "install", "session_secret"]

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"


def create_web_router() -> APIRouter:
    """Every review page route, under /review."""
    router = APIRouter()
    for area in (session.router, worklist.router, study.router, agreement.router, risk.router):
        router.include_router(area)
    return router


def install(app: FastAPI) -> None:
    """Mount the review page, its static files and its session middleware on `app`.

    Needs `app.state.cfg`, `store`, `holder` and `data_dir` (set by `create_app`)."""
    from fastapi.staticfiles import StaticFiles
    from starlette.middleware.sessions import SessionMiddleware

    cfg: ServeConfig = app.state.cfg
    app.include_router(create_web_router())
    app.mount("/review/static", StaticFiles(directory=str(STATIC_DIR)), name="review-static")
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(app.state.data_dir),
        session_cookie="review_session",
        max_age=int(cfg.review.session_hours * 3600),
        same_site="lax",
        https_only=cfg.review.secure_cookies,
    )

    @app.exception_handler(WebDenied)
    async def _denied(request: Request, exc: WebDenied) -> Response:
        """Not signed in: to the sign-in page; else a short page in the reviewer's language."""
        if exc.status == 401:
            return RedirectResponse("/review/login", status_code=303)
        key = {400: "csrf_failed", 403: "forbidden", 404: "forbidden"}.get(exc.status, "forbidden")
        html = (
            templates()
            .get_template("message.html")
            .render(
                lang=exc.lang,
                t=lambda k, **v: t(exc.lang, k, **v),
                message=t(exc.lang, key),
                me=None,
                csrf="",
            )
        )
        return HTMLResponse(html, status_code=exc.status)
