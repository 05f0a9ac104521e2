"""`diagnostics train cxr|risk`, and the summaries the demo prints too."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from diagnostics.cli.common import SetOption, _fail, _load_train_config, _mlflow_ui_hint, _training


@_training
def train_cxr_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config")],
    set_: SetOption = None,
    resume: Annotated[
        str | None,
        typer.Option(help="run folder to resume, or 'last' for this config's latest run"),
    ] = None,
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="do not log to MLflow")] = False,
) -> None:
    """Train, calibrate, evaluate, export to ONNX, log to MLflow and register the model."""
    from diagnostics.data.cache import CacheBuildError
    from diagnostics.data.cxr import DatasetError
    from diagnostics.models.registry import UnknownModelError
    from diagnostics.train.cxr import train_cxr
    from diagnostics.train.export import ExportParityError

    cfg = _load_train_config(config, set_)
    try:
        result = train_cxr(cfg, resume=resume, log_to_mlflow=not no_mlflow)
    except (DatasetError, FileNotFoundError, ValueError, CacheBuildError, ExportParityError) as exc:
        raise _fail(str(exc)) from None
    except UnknownModelError as exc:
        raise _fail(str(exc)) from None
    typer.echo(_summary_table(result))
    if not no_mlflow:
        typer.echo(_mlflow_ui_hint())


@_training
def train_risk_cmd(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML risk config with schema")],
    set_: SetOption = None,
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="do not log to MLflow")] = False,
) -> None:
    """Train a calibrated risk model on a table, report governance metrics, export ONNX."""
    from diagnostics.configio import ConfigError
    from diagnostics.tables import SchemaError
    from diagnostics.train.risk import load_risk_config, train_risk

    try:
        cfg = load_risk_config(config, set_)
        result = train_risk(cfg, log_to_mlflow=not no_mlflow)
    except (ConfigError, SchemaError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(_risk_summary(result))
    if not no_mlflow:
        typer.echo(_mlflow_ui_hint())


def _summary_table(result: Any) -> str:
    lines = [
        f"{'finding':<16}{'val AUROC':>10}{'95% CI':>16}{'threshold':>11}{'sens':>7}{'spec':>7}"
        f"{'temp':>7}"
    ]
    for f, r in result.val.items():
        ci = f"{r['auroc_lo']:.3f}-{r['auroc_hi']:.3f}"
        lines.append(
            f"{f:<16}{r['auroc']:>10.4f}{ci:>16}{r['threshold']:>11.3f}{r['sensitivity']:>7.3f}"
            f"{r['specificity']:>7.3f}{r['temperature']:>7.2f}"
        )
    lines.append(f"mean val AUROC {result.mean_val_auroc:.4f}")
    lines.append(
        f"trained {result.epochs_run} epochs in {result.seconds:.0f} s on {result.device} "
        f"({result.precision}); ONNX parity max |dp| {result.parity:.1e}"
    )
    if result.timing:
        lines.append("time   " + ", ".join(f"{k} {v:.0f} s" for k, v in result.timing.items()))
    check = result.metadata.population.check if result.metadata.population else None
    if check is not None:
        m = check.metrics
        lines.append(
            f"population check ({result.metadata.population.age_text()}): AUROC "
            f"{m['auroc']:.4f}; refuses {100 * m['outside_refused']:.1f}% of "
            f"{int(m['outside_held_images'])} held-out outside images and "
            f"{100 * m['inside_val_refused']:.1f}% of validation images"
        )
    lines.append(f"ONNX   {result.onnx_path}")
    lines.append(f"sha256 {result.sha256}")
    if result.int8:
        deltas = [v for k, v in result.int8.items() if k.endswith("auroc_delta") and v == v]
        lines.append(
            f"int8   {result.int8['path']} (max |dp| vs fp32 {result.int8['max_prob_diff']:.3f}, "
            f"val AUROC change {min(deltas, default=0.0):+.4f})"
        )
        lines.append(f"sha256 {result.int8['sha256']}")
    if result.run_id:
        version = f", registered version {result.model_version}" if result.model_version else ""
        lines.append(f"MLflow run {result.run_id}{version}")
    return "\n".join(lines)


def _slope_cell(r: dict[str, Any]) -> str:
    """A calibration slope for the summary table; "undef" where it does not exist."""
    return "undef" if r.get("calibration_note") else f"{r['calibration_slope']:.2f}"


def _risk_summary(result: Any) -> str:
    cv, te = result.cv, result.test
    ci = {n: f"{r['auroc_lo']:.3f}-{r['auroc_hi']:.3f}" for n, r in (("cv", cv), ("test", te))}
    return "\n".join(
        [
            result.table.summary(),
            f"{'':<6}{'AUROC':>8}{'95% CI':>16}{'AUPRC':>8}{'Brier':>8}{'slope':>8}{'ECE':>7}"
            f"{'sens':>7}{'spec':>7}",
            *[
                f"{name:<6}{r['auroc']:>8.3f}{ci[name]:>16}"
                f"{r['auprc']:>8.3f}{r['brier']:>8.3f}{_slope_cell(r):>8}{r['ece']:>7.3f}"
                f"{r['sensitivity']:>7.3f}{r['specificity']:>7.3f}"
                for name, r in (("cv", cv), ("test", te))
            ],
            *[
                f"{name}: calibration slope undefined: {r['calibration_note']}"
                for name, r in (("cv", cv), ("test", te))
                if r.get("calibration_note")
            ],
            f"threshold {te['threshold']:.3f}; ONNX parity max |dp| {result.parity:.1e}; "
            f"{result.seconds:.0f} s",
            f"ONNX   {result.onnx_path}",
            f"sha256 {result.sha256}",
            *(
                [f"MLflow run {result.run_id}, registered version {result.model_version}"]
                if result.run_id
                else []
            ),
        ]
    )
