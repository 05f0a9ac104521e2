"""`diagnostics data`: synthetic chest X-rays, dataset checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from diagnostics.cli.common import SetOption, _fail, _training, load_data_config


@_training
def data_check(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="YAML config with a data: section")
    ],
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Images and patients per split, prevalence per finding (with NaN counts), patient overlap."""
    from diagnostics.data.check import render, summarize
    from diagnostics.data.cxr import DatasetError, load_dataset

    cfg = load_data_config(config, set_)
    try:
        table = load_dataset(cfg)
    except DatasetError as exc:
        raise _fail(str(exc)) from None
    summary = summarize(table)
    typer.echo(json.dumps(summary, indent=2) if as_json else render(summary))
    if summary["patient_overlap"]:
        raise typer.Exit(code=1)


@_training
def data_synth_cxr(
    out: Annotated[Path, typer.Argument(help="output folder")],
    n: Annotated[int, typer.Option("--n", min=1, help="number of images")] = 200,
    size: Annotated[int, typer.Option("--size", min=32, max=2048, help="image side, px")] = 128,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    difficulty: Annotated[float, typer.Option(min=0.0, max=1.0, help="0 easy .. 1 hard")] = 0.3,
    fmt: Annotated[str, typer.Option("--format", help="png or dicom")] = "png",
    bits: Annotated[int, typer.Option(help="DICOM BitsStored: 12 or 16")] = 12,
    photometric: Annotated[str, typer.Option(help="MONOCHROME1 or MONOCHROME2")] = "MONOCHROME2",
) -> None:
    """Write synthetic chest X-rays with ground-truth masks and a manifest.csv."""
    from diagnostics.data.synthetic import write_dataset

    if fmt not in ("png", "dicom"):
        raise _fail("--format must be png or dicom")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _fail("--photometric must be MONOCHROME1 or MONOCHROME2")
    if bits not in (12, 16):
        raise _fail("--bits must be 12 or 16")
    if out.exists() and not out.is_dir():
        raise _fail(f"{out} exists and is not a folder")
    try:
        manifest = write_dataset(
            out,
            n,
            size=size,
            seed=seed,
            difficulty=difficulty,
            fmt=fmt,
            bits=bits,
            photometric=photometric,  # type: ignore[arg-type]
        )
    except OSError as exc:
        raise _fail(f"cannot write to {out}: {exc.strerror or exc}") from None
    typer.echo(f"wrote {n} images and {manifest}")
