"""Responses: JSON that refuses NaN, and RFC 7807 problem+json with a stable `code` for every
error, whoever raised it (a route, the store, the body timeout, FastAPI's validation)."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from diagnostics.serve.server import RequestTimedOut, RequestTooLarge
from diagnostics.serve.store import StoreBusy, StoreFull

log = logging.getLogger("diagnostics.serve")

PROBLEM = "application/problem+json"


class Problem(Exception):
    """An error answered as problem+json: HTTP status, stable code, plain-words detail."""

    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    405: "Method not allowed",
    408: "Request timeout",
    413: "Request too large",
    415: "Unsupported media type",
    422: "Input refused",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
    507: "Insufficient storage",
}


def problem_response(
    status: int, code: str, detail: str, instance: str = "", headers: dict[str, str] | None = None
) -> Response:
    body = {
        "type": f"https://diagnostics.example/problems/{code}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    return Response(
        json.dumps(body, allow_nan=False), status_code=status, media_type=PROBLEM, headers=headers
    )


def json_response(doc: Any, status: int = 200) -> Response:
    """JSON that refuses NaN: a NaN would mean a bug upstream, never a score."""
    return Response(
        json.dumps(doc, allow_nan=False, default=_default),
        status_code=status,
        media_type="application/json",
    )


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, datetime):
        return o.isoformat()
    raise TypeError(type(o).__name__)


# --------------------------------------------------------------------------- handlers


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error as problem+json (an unhandled one as 500, logged with its trace)."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        request.state.problem_code = exc.code  # for the request log line
        return problem_response(exc.status, exc.code, exc.detail, request.url.path, exc.headers)

    @app.exception_handler(StoreBusy)
    async def _busy(request: Request, exc: StoreBusy) -> Response:
        return problem_response(
            503,
            "database_busy",
            "The database is busy; retry shortly.",
            request.url.path,
            {"Retry-After": "2"},
        )

    @app.exception_handler(StoreFull)
    async def _full(request: Request, exc: StoreFull) -> Response:
        log.error("database full on %s %s", request.method, request.url.path)
        return problem_response(
            507, "insufficient_storage", "The service's database is full.", request.url.path
        )

    @app.exception_handler(RequestTooLarge)
    async def _too_large(request: Request, exc: RequestTooLarge) -> Response:
        request.state.problem_code = "request_too_large"
        return problem_response(
            413, "request_too_large", exc.message, request.url.path, {"Connection": "close"}
        )

    @app.exception_handler(RequestTimedOut)
    async def _timed_out(request: Request, exc: RequestTimedOut) -> Response:
        request.state.problem_code = "request_timeout"
        return problem_response(
            408, "request_timeout", exc.message, request.url.path, {"Connection": "close"}
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
            for e in exc.errors()
        ]
        return problem_response(422, "invalid_request", "; ".join(parts), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return problem_response(exc.status_code, code, str(exc.detail), request.url.path)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.error("unhandled %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
        return problem_response(
            500, "internal_error", "The service failed; the error was logged.", request.url.path
        )
