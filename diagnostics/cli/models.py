"""`diagnostics models`: registered versions, compared, promoted behind a gate, rolled back,
recalibrated for a site, pulled as files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from diagnostics.cli import registry
from diagnostics.cli.common import (
    DEFAULT_SERVE_CONFIG,
    SetOption,
    _fail,
    _open_store,
    _serve_config,
    _training,
    load_data_config,
)


@_training
def models_list() -> None:
    """Registered versions with aliases, sha256, training run, dataset digest, val AUROC."""
    from diagnostics.train.governance import list_models

    rows = list_models()
    if not rows:
        typer.echo("no registered models (train one: `make demo`)")
        return
    typer.echo(
        f"{'model':<18}{'ver':>4}  {'aliases':<14}{'sha256':<14}{'run':<10}"
        f"{'dataset':<14}{'val AUROC':>9}"
    )
    for r in rows:
        auc = f"{r['val_mean_auroc']:.4f}" if r["val_mean_auroc"] is not None else "—"
        typer.echo(
            f"{r['name']:<18}{r['version']:>4}  {','.join(r['aliases']) or '-':<14}"
            f"{(r['sha256'] or '-')[:12]:<14}{(r['run_id'] or '-')[:8]:<10}"
            f"{(r['dataset_digest'] or '-')[:12]:<14}{auc:>9}"
        )


@_training
def models_compare(
    candidate: Annotated[str, typer.Argument(help="models:/NAME/VERSION, @ALIAS or a .onnx")],
    baseline: Annotated[
        str | None, typer.Argument(help="the model to compare against (not with --int8)")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="evaluation dataset config")
    ] = None,
    split: Annotated[str, typer.Option(help="split to score, or 'all'")] = "val",
    subgroup: Annotated[
        list[str] | None, typer.Option(help="a subgroup column (repeatable): sex, view, site")
    ] = None,
    bootstrap: Annotated[int, typer.Option(min=0)] = 1000,
    out: Annotated[Path, typer.Option(help="folder for compare.md and compare.json")] = Path(
        "compare"
    ),
    population_check: Annotated[
        bool,
        typer.Option(
            help="compare only on images both models would score with a call at the clinic "
            "(the default); off: every image, with a note"
        ),
    ] = True,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="compare the candidate's fp32 file with its int8 variant (model.int8.onnx "
            "beside it, or the version's int8 artefact): AUROC per finding, probability "
            "differences, agreement of the calls, ms per image at batch 1",
        ),
    ] = False,
    set_: SetOption = None,
) -> None:
    """Both models on the same images: AUROC difference (paired bootstrap, DeLong),
    calibration, operating points, disagreements, subgroups; logged to MLflow. Images the
    clinic's QC would withhold from either model are counted, not compared. With --int8: one
    model's fp32 and int8 files."""
    from diagnostics.data.cxr import DatasetError
    from diagnostics.train.governance import compare

    if config is None:
        raise _fail("--config (the evaluation dataset) is needed")
    if int8:
        if baseline is not None:
            raise _fail("--int8 compares one model's two files: give no baseline")
        _compare_int8(candidate, load_data_config(config, set_), split, out)
        return
    if baseline is None:
        raise _fail("give a baseline model to compare against (or --int8)")
    try:
        report = compare(
            candidate,
            baseline,
            load_data_config(config, set_),
            split=split,
            subgroups=subgroup or [],
            n_boot=bootstrap,
            out_dir=out,
            population_check=population_check,
        )
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo((out / "compare.md").read_text())
    typer.echo(f"wrote {out}/compare.md and compare.json; MLflow run {report['evidence_run']}")


def _compare_int8(model: str, data_cfg: Any, split: str, out: Path) -> None:
    """`models compare MODEL --int8`: the fp32 file against its int8 variant."""
    from diagnostics.data.cxr import DatasetError
    from diagnostics.train.compare import compare_precisions

    try:
        path, version = registry.resolve(model)
        int8_path, note = registry.resolve_int8(model, path, version)
        if int8_path is None:
            raise _fail(f"{model}: {note}")
        compare_precisions(path, int8_path, data_cfg, split=split, out_dir=out, label=model)
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo((out / "compare.md").read_text())
    typer.echo(f"wrote {out}/compare.md and compare.json")


@_training
def models_promote(
    candidate: Annotated[str, typer.Argument(help="models:/NAME/VERSION")],
    gate: Annotated[Path, typer.Option(help="gate YAML (configs/gates/)")],
    alias: Annotated[str, typer.Option(help="the alias to move")] = "champion",
    out: Annotated[Path, typer.Option(help="folder for the evidence report")] = Path("promotion"),
    dry_run: Annotated[bool, typer.Option(help="check the gate, move nothing")] = False,
) -> None:
    """Move an alias to a candidate only if every rule of the gate passes."""
    from pydantic import ValidationError

    from diagnostics.configio import validation_lines
    from diagnostics.train.governance import load_gate, promote

    try:
        rules = load_gate(gate)
    except ValidationError as exc:
        raise _fail(f"{gate}:\n{validation_lines(exc)}") from None
    except FileNotFoundError:
        raise _fail(f"{gate} not found") from None
    try:
        result = promote(candidate, alias, rules, out_dir=out, dry_run=dry_run)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    for rule, ok, detail in result["rules"]:
        typer.echo(f"  [{'pass' if ok else 'FAIL'}] {rule}: {detail}")
    name, version = result["name"], result["version"]
    if result["promoted"]:
        typer.echo(
            f"{name} version {version} is now @{alias} (was {result['previous'] or 'none'}); "
            f"evidence run {result['evidence_run']}"
        )
    elif dry_run:
        typer.echo("dry run: nothing moved")
    else:
        typer.secho(f"not promoted: @{alias} stays on {result['previous'] or 'none'}", fg="red")
        raise typer.Exit(code=1)


@_training
def models_recalibrate(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or .onnx")],
    site: Annotated[str, typer.Option(help="the clinic code the profile applies to")],
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="image models: the site's labelled data (config)"),
    ] = None,
    table: Annotated[
        Path | None,
        typer.Option(
            help="risk models: the site's labelled rows (CSV in the model's schema, with the "
            "outcome column)"
        ),
    ] = None,
    rows: Annotated[
        list[str] | None,
        typer.Option(
            "--rows",
            help="risk models: use only the rows where COL=VALUE (repeatable), e.g. SiteNo=7",
        ),
    ] = None,
    from_outcomes: Annotated[
        bool,
        typer.Option(
            "--from-outcomes",
            help="risk models: from the outcomes clinicians recorded in the service for the "
            "site's records scored by this model file (instead of --table)",
        ),
    ] = False,
    policy: Annotated[
        str | None, typer.Option(help="threshold policy; default: the model's own")
    ] = None,
    min_cases: Annotated[
        int,
        typer.Option(
            min=1, help="positives and negatives needed (--population: images; default 100)"
        ),
    ] = 30,
    population: Annotated[
        bool,
        typer.Option(
            "--population",
            help="fit the site's threshold for the model's population check instead, from "
            "the site's images of patients inside the intended population",
        ),
    ] = False,
    serve_config: Annotated[
        Path, typer.Option(help="the service config (its database holds the profiles)")
    ] = DEFAULT_SERVE_CONFIG,
    set_: SetOption = None,
) -> None:
    """Fit a site's temperature and thresholds (or, with --population, its population-check
    threshold); store them as a site profile for this model file. The service applies it to
    that site's studies; the ONNX file is not changed. A new profile keeps the site's other
    settings from its previous one.

    Risk models: from the site's labelled rows (--table, --rows COL=VALUE), or from the outcomes
    its clinicians recorded in the service (--from-outcomes), a logistic recalibration:
    temperature (1 / slope), intercept and threshold."""
    from diagnostics.data.cxr import DatasetError
    from diagnostics.train.recalibrate import SampleTooSmall, recalibrate, recalibrate_population

    try:
        path, _ = registry.resolve(model)
        task = _model_task(path)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if task == "risk":
        store, _ = _open_store(_serve_config(serve_config, None))
        if from_outcomes:
            if table is not None or rows or config is not None:
                raise _fail("--from-outcomes reads the service's outcomes: no --table or --rows")
            result = _recalibrate_risk_outcomes(
                path, store.risk_outcome_pairs([site]), policy=policy, min_cases=min_cases
            )
        else:
            result = _recalibrate_risk(
                path, config, table, rows, population, set_, policy=policy, min_cases=min_cases
            )
        row = _save_site_profile(store, result, site, population=False)
        for line in _risk_lines(result):
            typer.echo(line)
        typer.echo(f"site profile {row.id} for {site}, model sha256 {result['model_sha256'][:12]}")
        return
    if table is not None or rows or from_outcomes:
        raise _fail(
            f"{Path(path).name} is an image model ({task}): give the site's labelled images "
            "with --config; --table, --rows and --from-outcomes are for risk models"
        )
    if config is None:
        raise _fail(f"{Path(path).name} is an image model ({task}): --config is needed")
    try:
        data = load_data_config(config, set_)
        result = (
            recalibrate_population(path, data, min_images=max(min_cases, 100))
            if population
            else recalibrate(path, data, policy=policy, min_cases=min_cases)
        )
    except SampleTooSmall as exc:
        raise _fail(f"sample too small: {exc}") from None
    except (DatasetError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    store, _ = _open_store(_serve_config(serve_config, None))
    row = _save_site_profile(store, result, site, population=population)
    for line in _population_lines(result, site) if population else _threshold_lines(result):
        typer.echo(line)
    typer.echo(f"site profile {row.id} for {site}, model sha256 {result['model_sha256'][:12]}")


def _model_task(path: Path) -> str:
    """'cxr' or 'risk', from the model file's metadata."""
    import onnxruntime as ort

    from diagnostics.contract import ModelMetadata

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for a file it cannot read
        raise ValueError(f"{Path(path).name} is not a readable ONNX model: {exc}") from None
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map).task


def _recalibrate_risk(
    path: Path,
    config: Path | None,
    table: Path | None,
    rows: list[str] | None,
    population: bool,
    set_: list[str] | None,
    *,
    policy: str | None,
    min_cases: int,
) -> dict[str, Any]:
    """`recalibrate_risk` with the command's options checked for a risk model."""
    from diagnostics.tables import SchemaError
    from diagnostics.train.recalibrate import SampleTooSmall
    from diagnostics.train.recalibrate_risk import recalibrate_risk

    name = Path(path).name
    if config is not None or set_:
        raise _fail(
            f"{name} is a risk model: give the site's labelled rows with --table CSV "
            "(--config and --set are for image models)"
        )
    if population:
        raise _fail(f"{name} is a risk model: it has no population check to recalibrate")
    if table is None:
        raise _fail(f"{name} is a risk model: --table CSV (the site's labelled rows) is needed")
    selection: dict[str, str] = {}
    for item in rows or []:
        column, sep, value = item.partition("=")
        if not sep or not column.strip():
            raise _fail(f"--rows {item}: use COL=VALUE, e.g. SiteNo=7")
        selection[column.strip()] = value.strip()
    try:
        return recalibrate_risk(
            path, table, rows=selection or None, policy=policy, min_cases=min_cases
        )
    except SampleTooSmall as exc:
        raise _fail(f"sample too small: {exc}") from None
    except (SchemaError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None


def _recalibrate_risk_outcomes(
    path: Path, pairs: list[Any], *, policy: str | None, min_cases: int
) -> dict[str, Any]:
    from diagnostics.train.recalibrate import SampleTooSmall
    from diagnostics.train.recalibrate_risk import recalibrate_risk_from_outcomes

    try:
        return recalibrate_risk_from_outcomes(path, pairs, policy=policy, min_cases=min_cases)
    except SampleTooSmall as exc:
        raise _fail(f"sample too small: {exc}") from None
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _save_site_profile(store: Any, result: dict[str, Any], site: str, *, population: bool) -> Any:
    """A new site profile from a recalibration; what it did not fit, the site's previous
    profile keeps (its thresholds for a population fit, its population threshold otherwise).
    A risk model's fit also carries its intercepts (None for image models)."""
    from diagnostics.train.governance import actor

    previous = store.site_profile(result["model_sha256"], site)
    if population:
        return store.save_profile(
            model_sha256=result["model_sha256"],
            site=site,
            temperatures=previous.temperatures if previous else {},
            thresholds=previous.thresholds if previous else {},
            intercepts=previous.intercepts if previous else None,
            policy=previous.policy if previous else "model's own",
            evidence={**(previous.evidence if previous else {}), "population": result["evidence"]},
            population_threshold=result["population_threshold"],
            created_by=actor()[:64],
        )
    return store.save_profile(
        model_sha256=result["model_sha256"],
        site=site,
        temperatures=result["temperatures"],
        thresholds=result["thresholds"],
        intercepts=result.get("intercepts"),
        policy=result["policy"],
        evidence=result["evidence"],
        population_threshold=previous.population_threshold if previous else None,
        created_by=actor()[:64],
    )


def _risk_lines(result: dict[str, Any]) -> list[str]:
    def num(v: float | None, digits: int = 3) -> str:
        return "undefined" if v is None else f"{v:.{digits}f}"

    lines = []
    for f, e in result["evidence"].items():
        b, a = e["before"], e["after"]
        lines.append(
            f"{f}: n={e['n']} ({e['positives']} positive), policy {e['policy']}: "
            f"temperature {result['temperatures'][f]:.3f}, intercept "
            f"{result['intercepts'][f]:+.3f}"
        )
        lines.append(
            f"  calibration intercept {num(b['calibration_intercept'])} -> "
            f"{num(a['calibration_intercept'])}, slope {num(b['calibration_slope'])} -> "
            f"{num(a['calibration_slope'])}"
        )
        lines.append(
            f"  threshold {e['model_threshold']:.3f} -> {result['thresholds'][f]:.3f}; "
            f"sensitivity {num(b['sensitivity'])} -> {num(a['sensitivity'])}, "
            f"specificity {num(b['specificity'])} -> {num(a['specificity'])} "
            "(on the rows fitted)"
        )
    refused = result.get("refused") or {}
    if refused:
        lines.append(
            "refused, not used: " + ", ".join(f"{code} {n}" for code, n in refused.items())
        )
    return lines


def _population_lines(result: dict[str, Any], site: str) -> list[str]:
    e = result["evidence"]
    lines = [
        f"population check: n={e['n']} in-population images of {site}; threshold "
        f"{e['model_threshold']:.3f} -> {result['population_threshold']:.3f}; refused "
        f"{100 * e['refused_before']:.1f}% -> {100 * e['refused_after']:.1f}% of them"
    ]
    if result["population_threshold"] < e["model_threshold"]:
        lines.append(
            "  note: a lower threshold lets more patients outside the population through "
            "(at the model's own threshold it refused "
            f"{100 * (e['model_outside_refused'] or float('nan')):.1f}% of held-out outside "
            "images); check a sample of the site's adults with `diagnostics evaluate`"
        )
    return lines


def _threshold_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for f, e in result["evidence"].items():
        b, a = e["before"], e["after"]
        lines.append(
            f"{f}: n={e['n']} ({e['positives']} positive), policy {e['policy']}: "
            f"threshold {e['model_threshold']:.3f} -> {result['thresholds'][f]:.3f}, "
            f"temperature {e['model_temperature']:.2f} -> {result['temperatures'][f]:.2f}; "
            f"sensitivity {b['sensitivity']:.3f} -> {a['sensitivity']:.3f}, "
            f"specificity {b['specificity']:.3f} -> {a['specificity']:.3f}"
        )
    return lines


@_training
def models_rollback(
    name: Annotated[str, typer.Argument(help="registered model name")],
    alias: Annotated[str, typer.Option()] = "champion",
) -> None:
    """Move the alias back to the version it held before the latest promotion."""
    from diagnostics.train.governance import rollback

    try:
        r = rollback(name, alias)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{name}@{alias}: {r['from']} -> {r['to'] or '(unset)'}")


def models_pull(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION")],
    out: Annotated[Path, typer.Option(help="folder for NAME-vVERSION.onnx and its .sha256")] = Path(
        "."
    ),
) -> None:
    """Download a registered model file: NAME-vVERSION.onnx and its .sha256.

    Over the tracking server's REST API (no mlflow needed) when the tracking URI is http(s),
    checked against the sha256 training recorded. `sha256sum -c` reads the .sha256 file."""
    import hashlib
    import shutil

    if not model.startswith("models:/"):
        raise _fail("give a registry URI: models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        path, version = registry.resolve(model)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from None
    name = model[len("models:/") :].split("@")[0].split("/")[0]
    dest = out / f"{name}-v{version}.onnx" if version else out / f"{name}.onnx"
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        shutil.copyfile(path, tmp)
        tmp.replace(dest)
        dest.with_name(dest.name + ".sha256").write_text(f"{h}  {dest.name}\n")
    except OSError as exc:
        raise _fail(f"cannot write to {out}: {exc.strerror or exc}") from None
    typer.echo(f"{model} -> version {version}, sha256 {h}")
    typer.echo(f"wrote {dest} and {dest.name}.sha256")
