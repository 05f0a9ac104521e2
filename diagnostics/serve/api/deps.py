"""What a route depends on: the caller (`Principal`, from the API key) and the service's parts.

The parts live on `app.state`, set once by `create_app`: `cfg`, `store`, `holder` (the model
serving now), `worker`, `metrics`, `limiter` and `data_dir`. Routes take them as parameters
(`store: StoreDep`), never from a closure, so each area's router stands on its own.

`need` and `visible_study` are called in the route body, after FastAPI has validated the
request: a malformed request answers 422 before any role or study check, as it always has.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from diagnostics.serve.api.admission import RateLimiter
from diagnostics.serve.api.errors import Problem
from diagnostics.serve.api.metrics import Metrics
from diagnostics.serve.config import ServeConfig
from diagnostics.serve.models import ModelHolder
from diagnostics.serve.store import Store
from diagnostics.serve.worker import Worker


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: str  # submitter | reviewer | admin
    clinic: str | None  # submitter's clinic
    scope: tuple[str, ...]  # reviewer's clinics

    def visible(self) -> list[str] | None:
        """Clinics this principal may see; None = all (admin)."""
        if self.role == "admin":
            return None
        if self.role == "submitter":
            return [self.clinic] if self.clinic else []
        return list(self.scope)

    def can_see(self, clinic: str) -> bool:
        v = self.visible()
        return v is None or clinic in v


# --------------------------------------------------------------------------- the service's parts


def _state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency returning `app.state.<name>` (async: it needs no thread from the pool)."""

    async def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    get.__name__ = f"get_{name}"
    return get


ConfigDep = Annotated[ServeConfig, Depends(_state("cfg"))]
StoreDep = Annotated[Store, Depends(_state("store"))]
HolderDep = Annotated[ModelHolder, Depends(_state("holder"))]
WorkerDep = Annotated[Worker, Depends(_state("worker"))]
MetricsDep = Annotated[Metrics, Depends(_state("metrics"))]
LimiterDep = Annotated[RateLimiter, Depends(_state("limiter"))]
DataDirDep = Annotated[Path, Depends(_state("data_dir"))]


# --------------------------------------------------------------------------- auth


def principal(request: Request, cfg: ConfigDep, store: StoreDep) -> Principal:
    """The caller, from its API key (`Authorization: Bearer` or `X-API-Key`); 401 without one.

    With `auth: false` (development) everyone is an admin."""
    if not cfg.auth:
        return Principal("dev", "admin", None, ())
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else ""
    key = key or request.headers.get("x-api-key", "").strip()
    if not key:
        raise Problem(
            401,
            "unauthenticated",
            "Send your API key as 'Authorization: Bearer <key>'.",
            {"WWW-Authenticate": "Bearer"},
        )
    row = store.authenticate(key)
    if row is None:
        raise Problem(
            401,
            "invalid_key",
            "The API key is unknown or revoked.",
            {"WWW-Authenticate": "Bearer"},
        )
    return Principal(row.id, row.role, row.clinic_id, tuple(row.scope or ()))


PrincipalDep = Annotated[Principal, Depends(principal)]


def need(p: Principal, *roles: str) -> None:
    """403 unless the caller has one of `roles`."""
    if p.role not in roles:
        raise Problem(403, "role_forbidden", f"This needs a {' or '.join(roles)} key.")


def visible_study(store: Store, p: Principal, study_id: str) -> Any:
    """The study, if the caller may see it; 404 otherwise, whether or not it exists."""
    study = store.get_study(study_id)
    if study is None or not p.can_see(study.clinic_id):
        raise Problem(404, "study_not_found", "No such study.")  # same answer: no leak
    return study
