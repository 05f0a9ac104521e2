"""The `diagnostics` command line. Thin: heavy modules are imported inside the commands."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="AI diagnostic support: CXR and clinical-risk models, from training to clinic review.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: synthetic data, checks.", no_args_is_help=True)
app.add_typer(data_app, name="data")

log = logging.getLogger("diagnostics")

SOURCES = ("nih14", "chexpert", "mimic_cxr", "vindr_cxr", "rsna", "manifest", "folders")

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a config value: a.b=value (repeatable)"),
]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def load_data_config(config: Path, overrides: list[str] | None) -> Any:
    """The `data:` section of a config file (a dataset config, or a training config holding one)."""
    from pydantic import ValidationError

    from diagnostics.configio import ConfigError, apply_overrides, load_yaml
    from diagnostics.data.config import parse_dataset_config

    outside = [o for o in overrides or [] if not o.strip().startswith("data.")]
    if outside:
        raise _fail(f"--set {outside[0]}: this command reads only the data: section; use data.KEY")
    try:
        raw = apply_overrides(load_yaml(config), overrides or [])
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    section = raw.get("data", raw if "source" in raw else None)
    if not isinstance(section, dict):
        raise _fail(f"{config}: no 'data:' section")
    try:
        return parse_dataset_config(section)
    except ValidationError as exc:
        source = f"{config} with --set overrides" if overrides else str(config)
        raise _fail(f"{source}: invalid data config:\n{format_validation_error(exc)}") from None


def format_validation_error(exc: Any) -> str:
    """One line per problem: `data.split.fractions: fractions must sum to 1`."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] in SOURCES:  # pydantic prefixes the union branch: drop it
            loc = loc[1:]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}"
        lines.append(f"  data.{'.'.join(loc)}: {message}" if loc else f"  data: {message}")
    return "\n".join(lines)


@data_app.command("check")
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


@data_app.command("synth-cxr")
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


@app.command()
def demo(
    n: Annotated[int, typer.Option("--n", min=10)] = 300,
    size: Annotated[int, typer.Option("--size", min=32)] = 128,
) -> None:
    """End to end on built-in synthetic data: generate a dataset, then check it."""
    from diagnostics.data.check import render, summarize
    from diagnostics.data.cxr import load_dataset
    from diagnostics.data.synthetic import write_dataset
    from diagnostics.settings import get_settings

    home = get_settings().home
    out = home / "demo" / "synth"
    typer.echo(f"[1/2] synthetic chest X-rays -> {out}")
    config = Path("configs/cxr/demo.yaml")
    if not config.is_file():
        raise _fail(f"{config} not found: run the demo from the project root")
    manifest = write_dataset(out, n, size=size, seed=0)
    cfg = load_data_config(config, [f"data.labels_file={manifest}"])
    typer.echo(f"[2/2] data check ({config})")
    typer.echo(render(summarize(load_dataset(cfg))))
