"""`diagnostics report` (a study's report, as the HIS receives it) and `reviews export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from diagnostics.cli.common import (
    DEFAULT_SERVE_CONFIG,
    ServeConfigOption,
    _fail,
    _open_store,
    _serve_config,
)


def report(
    study_id: Annotated[str, typer.Argument(help="the study ID")],
    format: Annotated[str, typer.Option(help="fhir or text")] = "fhir",
    lang: Annotated[str, typer.Option(help="vi or en")] = "vi",
    out: Annotated[Path | None, typer.Option(help="write here instead of stdout")] = None,
    config: ServeConfigOption = DEFAULT_SERVE_CONFIG,
) -> None:
    """A study's report, as the HIS receives it: FHIR R4 DiagnosticReport or plain text."""
    from diagnostics.serve.reports import fhir_report, shown_model, text_report

    if format not in ("fhir", "text") or lang not in ("vi", "en"):
        raise _fail("--format is fhir or text; --lang is vi or en")
    store, _ = _open_store(_serve_config(config, None))
    study = store.get_study(study_id)
    if study is None:
        raise _fail(f"no study {study_id}")
    if study.status != "scored":
        raise _fail(f"study {study_id} is {study.status}: there is no report")
    view = store.study_view(study_id)
    store.log_access("cli", "report.read", "study", study_id, format=format, **shown_model(view))
    if format == "fhir":
        text = json.dumps(
            fhir_report(view, lang, store.dicom_uids(study_id)), indent=2, ensure_ascii=False
        )
    else:
        text = text_report(view, lang)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n", encoding="utf-8")
        typer.echo(f"wrote {out}")


def reviews_export(
    out: Annotated[Path, typer.Option(help="manifest CSV for `train cxr` (source: manifest)")],
    since: Annotated[str | None, typer.Option(help="ISO date: studies received since")] = None,
    clinic: Annotated[str | None, typer.Option(help="one clinic only")] = None,
    config: ServeConfigOption = DEFAULT_SERVE_CONFIG,
) -> None:
    """Reviewed labels back to training: image path, labels, pseudonymous patient key, site."""
    from datetime import UTC, datetime

    from diagnostics.serve.feedback import export_manifest

    when = None
    if since:
        try:
            when = datetime.fromisoformat(since)
        except ValueError:
            raise _fail("--since takes an ISO date, e.g. 2026-11-01") from None
        when = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    store, data_dir = _open_store(_serve_config(config, None))
    n = export_manifest(store, out, data_dir, since=when, clinic=clinic)
    store.log_access("cli", "reviews.export", "export", out.name[:64], studies=n)
    typer.echo(f"{n} reviewed studies -> {out}")
