"""Sign-in, sign-out and the page language.

Sign-in checks an argon2-hashed password and starts a new session (no fixation); a failed
sign-in is audited under the name tried (cut to 64 characters)."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from diagnostics.serve.api.deps import StoreDep
from diagnostics.serve.i18n import norm_lang, t
from diagnostics.serve.store import USERNAME
from diagnostics.serve.web.common import form_checked, lang_of, render

router = APIRouter(prefix="/review")


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> HTMLResponse:
    return render(request, "login.html", error=None)


@router.post("/login")
async def login(request: Request, store: StoreDep) -> Response:
    form = await form_checked(request)
    name, password = str(form.get("username", "")), str(form.get("password", ""))
    row = store.check_password(name, password) if USERNAME.fullmatch(name) else None
    if row is None:
        store.log_access("web", "user.login_failed", "user", name[:64].replace("\x00", ""))
        return render(request, "login.html", status=401, error=t(lang_of(request), "login_failed"))
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
