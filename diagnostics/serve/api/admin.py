"""Administration: check the model source now (e.g. right after a registry alias moved)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from diagnostics.serve.api.deps import HolderDep, PrincipalDep, StoreDep, need
from diagnostics.serve.api.errors import json_response

router = APIRouter(tags=["admin"])


@router.post("/v1/admin/model/reload")
def reload_model(p: PrincipalDep, store: StoreDep, holder: HolderDep) -> Response:
    """Check the model source now (e.g. right after an alias moved)."""
    need(p, "admin")
    switched = holder.refresh()
    store.log_access(
        p.key_id,
        "model.reload",
        "model",
        holder.model.sha256[:16],
        switched=switched,
        version=holder.model.version,
    )
    return json_response(
        {"switched": switched, "model": holder.model.describe(), "error": holder.last_error}
    )
