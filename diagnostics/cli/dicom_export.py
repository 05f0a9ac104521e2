"""`diagnostics dicom outbox` and `dicom resend`: the DICOM results bound for clinics' PACS.

Plain functions, registered on the `dicom` typer app by `diagnostics.cli.dicom`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from diagnostics.cli.common import (
    DEFAULT_SERVE_CONFIG,
    ServeConfigOption,
    SetOption,
    _fail,
    _open_store,
    _serve_config,
)

StudyOption = Annotated[str | None, typer.Option("--study", help="one study (its service ID)")]


def resend(
    study: StudyOption = None,
    all_failed: Annotated[
        bool, typer.Option("--all-failed", help="every failed object, of every study")
    ] = False,
    config: ServeConfigOption = DEFAULT_SERVE_CONFIG,
    sets: SetOption = None,
) -> None:
    """Send failed results again: back to pending with their attempts reset. The running
    service sends them at its next poll."""
    if (study is None) == (not all_failed):
        raise _fail("give either --study ID or --all-failed")
    store, _ = _open_store(_serve_config(config, sets))
    try:
        if study is not None and store.get_study(study) is None:
            raise _fail(f"no study {study}")
        n = store.resend(study_id=study, actor="cli")
    finally:
        store.close()
    typer.echo(f"{n} failed object(s) pending again")


def outbox(
    state: Annotated[
        str | None, typer.Option("--state", help="pending, sent or failed (default: all)")
    ] = None,
    study: StudyOption = None,
    config: ServeConfigOption = DEFAULT_SERVE_CONFIG,
    sets: SetOption = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="rows shown")] = 100,
) -> None:
    """The DICOM results outbox: what was sent to each clinic's PACS, what waits, what failed."""
    from diagnostics.serve.store.tables import OUTBOX_STATES

    if state is not None and state not in OUTBOX_STATES:
        raise _fail(f"--state must be one of {', '.join(OUTBOX_STATES)}")
    store, _ = _open_store(_serve_config(config, sets))
    try:
        items = store.outbox_items(study, state, limit)
    finally:
        store.close()
    if not items:
        typer.echo("no outbox rows")
        return
    rows = [
        (
            i.study_id,
            i.kind,
            i.key or "-",
            i.route,
            i.state,
            f"{i.attempts}/{i.max_attempts}",
            (i.last_error or "").replace("\n", " ")[:80],
        )
        for i in items
    ]
    header = ("study", "kind", "key", "route", "state", "attempts", "last error")
    widths = [max(len(r[k]) for r in (header, *rows)) for k in range(len(header) - 1)]
    for r in (header, *rows):
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
        typer.echo("  ".join([*cells, r[-1]]).rstrip())


__all__ = ["outbox", "resend"]
