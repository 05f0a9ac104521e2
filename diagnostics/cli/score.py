"""`diagnostics score`, `score-risk` and `evaluate`: a model file (or registry URI) on inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from diagnostics.cli import registry
from diagnostics.cli.common import SetOption, _fail, _training, load_data_config


def _collect_inputs(paths: list[Path]) -> list[Path]:
    """Files as given, and every file under the folders given (hidden files and DICOMDIR
    indexes aside): the content decides what is an image, not the name, so DICOM files named
    by their UID are found. A path that does not exist is kept: it gets a `not_found` record."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and not f.name.startswith(".") and f.name.upper() != "DICOMDIR"
            )
        else:
            out.append(p)
    return out


def _read_input(path: Path) -> tuple[str, bytes | dict[str, str]]:
    """(heatmap name, the file's bytes), or ("", the record of why it could not be read)."""
    import hashlib

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "", {"status": "failed", "code": "not_found", "message": "The file does not exist."}
    except OSError as exc:
        return "", {"status": "failed", "code": "unreadable", "message": str(exc.strerror or exc)}
    # heatmaps are named by content, so reruns into the same folder never mix
    return hashlib.sha256(data).hexdigest()[:16], data


def score(
    paths: Annotated[list[Path], typer.Argument(help="DICOM, PNG or JPEG files, or folders")],
    model: Annotated[str, typer.Option("--model", "-m", help="model.onnx or models:/NAME@ALIAS")],
    out: Annotated[
        Path, typer.Option(help="findings file: .jsonl or .csv, one record per input")
    ] = Path("findings.jsonl"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads; 0 = default")] = 0,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    heatmaps: Annotated[bool, typer.Option(help="write CAM overlays for positives")] = True,
    sha256: Annotated[
        str | None, typer.Option(help="refuse the model unless its sha256 is this")
    ] = None,
    outside_population: Annotated[
        str,
        typer.Option(
            help="refuse a patient outside the model's intended population, or flag: score "
            "with no call"
        ),
    ] = "refuse",
    precision: Annotated[
        str,
        typer.Option(
            help="auto: the model's int8 file where it passed its gate and the CPU has "
            "VNNI/AMX, else fp32; fp32; or int8 (refused where it cannot run)"
        ),
    ] = "auto",
) -> None:
    """Score chest X-rays with a CXR model: input QC, calibrated findings, CAM overlays.

    Every input gets a record, refusals included (with their code). The exit status is non-zero
    only for fatal errors (no model, unwritable output), never for a refused input.
    """
    from tqdm import tqdm

    from diagnostics.cli.serve import load_clinic_model
    from diagnostics.serve.precision import PrecisionError
    from diagnostics.serve.qc import QCConfig
    from diagnostics.serve.runner import ModelIntegrityError, Scorer, ScoreResult
    from diagnostics.serve.score_file import FindingsWriter

    if device not in ("auto", "cpu", "cuda"):
        raise _fail("--device is auto, cpu or cuda")
    if out.suffix.lower() not in (".jsonl", ".csv"):
        raise _fail("--out must end in .jsonl or .csv")
    if outside_population not in ("refuse", "flag"):
        raise _fail("--outside-population is refuse or flag")
    if precision not in ("auto", "fp32", "int8"):
        raise _fail("--precision is auto, fp32 or int8")
    try:
        inputs = _collect_inputs(paths)
        path, version = registry.resolve(model)
        runner = load_clinic_model(
            model,
            path,
            version,
            precision=precision,
            device=device,
            threads=threads or None,
            expected_sha256=sha256,
        )
        heat_dir = out.parent / f"{out.stem}_heatmaps" if heatmaps else None
        qc = QCConfig(population=outside_population)  # type: ignore[arg-type]
        scorer = Scorer(runner, qc, heatmap_dir=heat_dir, batch_size=batch_size)
    except (FileNotFoundError, ValueError, ModelIntegrityError, PrecisionError) as exc:
        raise _fail(str(exc)) from None
    if not any(p.exists() for p in inputs):
        raise _fail("no input files found: " + ", ".join(str(p) for p in paths))
    if runner.fallback:
        typer.secho("CUDA was requested but is unavailable: scoring on CPU", err=True, fg="yellow")
    counts: dict[str, int] = {}
    flagged = 0
    try:
        writer = FindingsWriter(out, runner.labels)
    except OSError as exc:
        raise _fail(f"cannot write {out}: {exc}") from None
    with writer, tqdm(total=len(inputs), unit="study", disable=None) as bar:
        # the Scorer reads and scores one batch at a time; unreadable files keep their place
        results = scorer.score_iter(_read_input(f) for f in inputs)
        for f, result in zip(inputs, results, strict=True):
            record = result.as_dict() if isinstance(result, ScoreResult) else result
            counts[record["status"]] = counts.get(record["status"], 0) + 1
            if record["status"] == "scored" and record.get("flags"):  # no call
                flagged += 1
            writer.write(str(f), record)
            bar.update()
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    if flagged:
        summary += f" ({flagged} of them scored with a flag and no call)"
    typer.echo(f"{len(inputs)} inputs: {summary}; provider {runner.provider} -> {out}")


def score_risk(
    table: Annotated[Path, typer.Argument(help="CSV or Parquet of records")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="risk model.onnx or models:/NAME@ALIAS")
    ],
    out: Annotated[Path, typer.Option(help="output CSV")] = Path("risk_scores.csv"),
) -> None:
    """Score records with a risk model: per row a risk and category, or why it was refused."""
    from diagnostics.serve.risk import RiskModel
    from diagnostics.tables import SchemaError, read_table

    try:
        path, _ = registry.resolve(model)
        scorer = RiskModel(path)
        result = scorer.score(read_table(table))
    except (SchemaError, ValueError, FileNotFoundError, KeyError) as exc:
        raise _fail(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(out, index=False)
    scored = int((result["status"] == "scored").sum())
    typer.echo(
        f"{scored} of {len(result)} records scored, {len(result) - scored} rejected "
        f"(reasons in the file); {scorer.label} threshold {scorer.threshold:.3f} -> {out}"
    )


@_training
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="model.onnx or models:/NAME@ALIAS")],
    config: Annotated[
        Path, typer.Option("--config", "-c", help="YAML config with a data: section")
    ],
    split: Annotated[str, typer.Option(help="split to score, or 'all' for every image")] = "val",
    set_: SetOption = None,
    out: Annotated[Path, typer.Option(help="where to write metrics.json")] = Path("metrics.json"),
    bootstrap: Annotated[int, typer.Option(min=0, help="resamples for the 95% CIs")] = 1000,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "cpu",
    population_check: Annotated[
        bool,
        typer.Option(
            help="run the clinic's QC and population check, and compute metrics only on what "
            "the clinic would score (the default); off: score everything, with a warning"
        ),
    ] = True,
) -> None:
    """Score a dataset with an exported ONNX model (ONNX Runtime, clinic preprocessing).

    CXR models: every image goes through the clinic's QC and intended-population check;
    metrics cover what the clinic would score, and the images it would withhold are counted
    by reason. Risk models take a risk config, whose table is validated against the schema
    inside the model file.
    """
    from diagnostics.configio import ConfigError
    from diagnostics.data.cxr import DatasetError
    from diagnostics.tables import SchemaError
    from diagnostics.train.evaluate import evaluate as run_eval
    from diagnostics.train.evaluate import evaluate_risk, json_safe, model_task, render_report

    try:
        if model_task(model) == "risk":
            if split not in ("val", "all"):
                raise ValueError(
                    "risk models are evaluated on every row of the table: give a held-out "
                    "table in the config (or --split all)"
                )
            result = evaluate_risk(model, config, set_ or [], n_boot=bootstrap)
        else:
            result = run_eval(
                model,
                load_data_config(config, set_),
                split=split,
                n_boot=bootstrap,
                device=device,
                population_check=population_check,
            )
    except (DatasetError, FileNotFoundError, ValueError, SchemaError, ConfigError) as exc:
        raise _fail(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
    typer.echo(render_report(result))
    typer.echo(f"wrote {out}")
