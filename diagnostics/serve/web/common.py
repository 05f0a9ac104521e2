"""What every review page shares: the signed-in reviewer, the CSRF token, the language, the
templates. The service's parts come from `app.state` (routes take them as parameters, with the
API's `deps`)."""

from __future__ import annotations

import hmac
import os
import secrets
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import HTMLResponse

from diagnostics.serve.config import ServeConfig
from diagnostics.serve.i18n import finding as finding_name
from diagnostics.serve.i18n import norm_lang, t
from diagnostics.serve.store import Store

if TYPE_CHECKING:
    from jinja2 import Environment

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


@cache
def templates() -> Environment:
    from jinja2 import Environment, PackageLoader, select_autoescape

    return Environment(
        loader=PackageLoader("diagnostics.serve", "templates"),
        autoescape=select_autoescape(["html"]),  # patient-supplied text is always escaped
    )


# --------------------------------------------------------------------------- session


def lang_of(request: Request) -> str:
    cfg: ServeConfig = request.app.state.cfg
    return norm_lang(request.session.get("lang") or cfg.review.default_language)


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(24)
    return str(token)


async def form_checked(request: Request) -> Any:
    """The posted form, if it carries this session's CSRF token; 400 otherwise."""
    form = await request.form()
    sent = str(form.get("csrf", ""))
    expected = str(request.session.get("csrf", ""))
    if not sent or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise WebDenied(400, lang_of(request))
    return form


def user(request: Request, store: Store) -> Any:
    """The signed-in reviewer's row; else to the sign-in page."""
    name = request.session.get("user")
    row = store.get_reviewer(name) if name else None
    if row is None:
        raise WebDenied(401, lang_of(request))
    return row


def visible(row: Any) -> list[str] | None:
    """Clinics the reviewer may see; None = all (admin)."""
    return None if row.role == "admin" else list(row.scope or [])


def render(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    lang = lang_of(request)
    html = (
        templates()
        .get_template(template)
        .render(
            lang=lang,
            t=lambda key, **v: t(lang, key, **v),
            fname=lambda label: finding_name(lang, label),
            csrf=csrf_token(request),
            me=request.session.get("user"),
            request_path=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            **ctx,
        )
    )
    return HTMLResponse(html, status_code=status)


# --------------------------------------------------------------------------- studies


def load_study(request: Request, store: Store, study_id: str) -> tuple[Any, Any]:
    """The reviewer and the study, if the reviewer may see it; 404 otherwise."""
    row = user(request, store)
    study = store.get_study(study_id)
    scope = visible(row)
    if study is None or (scope is not None and study.clinic_id not in scope):
        raise WebDenied(404, lang_of(request))
    return row, study


def impression_pending(cfg: ServeConfig, store: Store, row: Any, study: Any) -> bool:
    """At a site that reads before the AI: this reviewer has not yet written an impression."""
    if study.clinic_id not in cfg.review.independent_impression_clinics:
        return False
    return not any(
        a.action == "review.impression" and a.actor == f"user:{row.username}"
        for a in store.audit_rows(study.id)
    )
