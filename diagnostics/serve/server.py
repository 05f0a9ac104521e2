"""The HTTP server around the app: uvicorn with time limits on every part of a request.

uvicorn times out only idle keep-alive connections. A client that sends its headers slowly, or
stops in the middle of a body, would otherwise hold a connection (and, for an upload, a `.part`
file) for ever; stalled headers need no API key, so anyone could do it. Here:

- headers must be complete within `headers_s` of the connection opening (or of the previous
  response): otherwise the connection is closed;
- a body may pause at most `body_idle_s` between two pieces and take `body_total_s` in all:
  otherwise the request answers 408 `request_timeout` (an upload keeps nothing).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from diagnostics.serve.config import ServeConfig, TimeoutsSection

log = logging.getLogger("diagnostics.serve")


# Both are HTTPExceptions: FastAPI turns any other error raised while it reads a JSON body into
# a 400 "error parsing the body", and re-raises these; their own handlers answer them.


class RequestTooLarge(StarletteHTTPException):
    """A body over the limit for its route: answered 413."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)
        self.message = message


class RequestTimedOut(StarletteHTTPException):
    """The request body stalled or took too long: answered 408."""

    def __init__(self, message: str) -> None:
        super().__init__(408, message)
        self.message = message


class _HeaderTimedH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers do not arrive in time."""

    headers_s = 10.0  # set per server by `protocol_class`

    def connection_made(self, transport: Any) -> None:
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.headers_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_headers():
            self._arm()  # the deadline counts from the first byte, not the last
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()  # an idle keep-alive connection is uvicorn's own timeout
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            log.warning("headers incomplete after %.0f s: connection closed", self.headers_s)
            self.transport.close()


def protocol_class(timeouts: TimeoutsSection) -> type[H11Protocol]:
    return type("HeaderTimedH11", (_HeaderTimedH11,), {"headers_s": float(timeouts.headers_s)})


class BodyTimeout:
    """ASGI middleware: the body must keep coming (`idle_s`) and end in time (`total_s`).

    Only the body is timed: once it is complete, `receive` is passed through (Starlette waits
    on it for a disconnect while a response streams)."""

    def __init__(self, app: Any, idle_s: float, total_s: float) -> None:
        self.app, self.idle_s, self.total_s = app, idle_s, total_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_s
        done = False

        async def timed_receive() -> Any:
            nonlocal done
            if done:
                return await receive()
            left = deadline - loop.time()
            wait = min(self.idle_s, left)
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except TimeoutError:
                what = "paused" if left > self.idle_s else "took too long"
                raise RequestTimedOut(
                    f"The request body {what} (limits: {self.idle_s:g} s without data, "
                    f"{self.total_s:g} s in all); send it again."
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        await self.app(scope, timed_receive, send)


def streams_upload(method: str, path: str) -> bool:
    """The routes that stream an image body to disk under their own cap (limits.max_upload_mb):
    an upload, another image of a study, STOW-RS."""
    if method != "POST":
        return False
    parts = path.split("/")
    return (
        path == "/v1/studies"
        or (len(parts) == 5 and parts[:3] == ["", "v1", "studies"] and parts[4] == "instances")
        or path == "/dicomweb/studies"
        or (len(parts) == 4 and parts[:3] == ["", "dicomweb", "studies"])
    )


class RequestGuard:
    """ASGI middleware for what no route should have to check:

    - a NUL character in the path or query answers 400 (no identifier, code or filter holds one,
      and PostgreSQL refuses it in text);
    - a body over `max_body` bytes answers 413, from its Content-Length before anything is read,
      or as soon as it passes the cap; the upload route has its own streamed cap.
    """

    def __init__(self, app: Any, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope["query_string"].lower():
            await _send_problem(send, 400, "bad_request", "The request holds a NUL character.")
            return
        if streams_upload(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        limit = self.max_body
        too_large = f"The request body is over the limit of {limit // 1024} KB."
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_problem(send, 413, "request_too_large", too_large)
                return
        seen = 0

        async def capped_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise RequestTooLarge(too_large)
            return message

        await self.app(scope, capped_receive, send)


async def _send_problem(send: Any, status: int, code: str, detail: str) -> None:
    from diagnostics.serve.api.errors import problem_response

    response = problem_response(status, code, detail, headers={"Connection": "close"})
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Any:
    return {"type": "http.disconnect"}


def uvicorn_config(app: Any, cfg: ServeConfig, *, host: str, port: int) -> Any:
    """The uvicorn configuration every server of the service uses (CLI and tests alike)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(cfg.timeouts),
        timeout_keep_alive=int(max(1, cfg.timeouts.keep_alive_s)),
        log_config=None,
        access_log=False,
    )
