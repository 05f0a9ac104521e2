"""The `diagnostics` command line. Thin: heavy modules are imported inside the commands."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
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
train_app = typer.Typer(
    help="Train models (tracked in MLflow, exported to ONNX).", no_args_is_help=True
)
app.add_typer(train_app, name="train")
keys_app = typer.Typer(help="API keys of the clinic service.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
users_app = typer.Typer(help="Reviewer accounts for the review page.", no_args_is_help=True)
app.add_typer(users_app, name="users")
reviews_app = typer.Typer(help="Clinician reviews: export for training.", no_args_is_help=True)
app.add_typer(reviews_app, name="reviews")
models_app = typer.Typer(
    help="Registered models: list, compare, promote behind a gate, roll back, recalibrate.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")

log = logging.getLogger("diagnostics")

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


# What `pip install 'diagnostics[train]'` adds to a clinic install (which has none of these).
TRAINING_MODULES = frozenset(
    {
        "torch",
        "torchvision",
        "monai",
        "mlflow",
        "sklearn",
        "skl2onnx",
        "onnx",
        "scipy",
        "matplotlib",
    }
)


def _training(command: Callable[..., Any]) -> Callable[..., Any]:
    """For commands that train, evaluate or govern models: on a clinic install (no torch,
    mlflow or scikit-learn) they stop with the install line instead of a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ImportError as exc:
            missing = (exc.name or "").split(".")[0]
            if missing not in TRAINING_MODULES:
                raise
            raise _fail(
                f"this command needs the training libraries, and {missing} is not installed "
                "here (a clinic install): pip install 'diagnostics[train]'"
            ) from None

    return run


def load_data_config(config: Path, overrides: list[str] | None) -> Any:
    """The `data:` section of a config file (a dataset config, or a training config holding one)."""
    from pydantic import ValidationError

    from diagnostics.configio import ConfigError, apply_overrides, load_yaml, validation_lines
    from diagnostics.data.config import SOURCES, parse_dataset_config

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
        lines = validation_lines(exc, "data", SOURCES)
        raise _fail(f"{source}: invalid data config:\n{lines}") from None


@data_app.command("check")
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


@data_app.command("synth-cxr")
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


def _load_train_config(config: Path, overrides: list[str] | None) -> Any:
    from diagnostics.configio import ConfigError
    from diagnostics.train.config import load_train_config

    try:
        return load_train_config(config, overrides)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


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


def _mlflow_ui_hint() -> str:
    from diagnostics.settings import get_settings

    settings = get_settings()
    uri = settings.mlflow_uri()
    if uri.startswith("sqlite:"):
        return (
            f"open the MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} "
            f"--default-artifact-root {settings.artifact_root.resolve().as_uri()} --port 5000"
        )
    return f"open the MLflow UI of {uri}"


@train_app.command("cxr")
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


@train_app.command("risk")
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


@app.command("score-risk")
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
        path, _ = resolve_model_ref(model)
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


def _model_cache(cache_dir: Path | None = None) -> Path:
    """Where registry downloads are cached by sha256: the service's data folder when serving,
    else <home>/model-cache."""
    from diagnostics.settings import get_settings

    return cache_dir or get_settings().home / "model-cache"


def _registry_client(cache_dir: Path | None = None) -> Any:
    """The REST registry client (no mlflow) when the tracking URI is a server, else None."""
    from diagnostics.settings import get_settings

    uri = get_settings().mlflow_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    from diagnostics.serve.registry_client import RegistryClient

    return RegistryClient(uri, _model_cache(cache_dir))


def _local_registry() -> Any:
    """diagnostics.train.evaluate, which reads a local tracking store (SQLite, files) with
    mlflow; a clear error where mlflow is not installed (a clinic install)."""
    from diagnostics.settings import get_settings

    try:
        from diagnostics.train import evaluate
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in TRAINING_MODULES:
            raise
        raise FileNotFoundError(
            f"the tracking store {get_settings().mlflow_uri()} is local and is read with "
            f"mlflow, which is not installed here ({exc.name} is missing). Point "
            "DIAGNOSTICS_TRACKING_URI (or MLFLOW_TRACKING_URI) at the MLflow tracking server "
            "(http://HOST:PORT), give the .onnx file itself (`diagnostics models pull` writes "
            "one), or pip install 'diagnostics[train]'"
        ) from None
    return evaluate


def resolve_model_ref(model: str, cache_dir: Path | None = None) -> tuple[Path, str | None]:
    """A model argument -> (local .onnx path, registry version or None).

    Registry URIs of a tracking server (http/https) are resolved over its REST API, without
    mlflow, and cached by sha256 in `cache_dir` (default <home>/model-cache); when the server
    cannot be reached, the file cached for that URI is used, with a warning. A local store
    (SQLite, as `make demo` makes) is read with mlflow. The serving modules never import
    mlflow; they read the ONNX file directly and never unpickle anything.
    """
    if not model.startswith("models:/"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {model}")
        return path, None
    client = _registry_client(cache_dir)
    if client is not None:
        with client:
            found = client.resolve(model)
        return found.path, found.version
    evaluate = _local_registry()
    registry_version, resolve_model = evaluate.registry_version, evaluate.resolve_model

    path = resolve_model(model)
    try:
        version = registry_version(model)
    except Exception:  # the file is what matters; the version is provenance
        version = None
    return path, version


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


@app.command()
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
) -> None:
    """Score chest X-rays with a CXR model: input QC, calibrated findings, CAM overlays.

    Every input gets a record, refusals included (with their code). The exit status is non-zero
    only for fatal errors (no model, unwritable output), never for a refused input.
    """
    import hashlib

    from tqdm import tqdm

    from diagnostics.serve.qc import QCConfig
    from diagnostics.serve.runner import ModelIntegrityError, OnnxModel, Scorer
    from diagnostics.serve.score_file import FindingsWriter

    if device not in ("auto", "cpu", "cuda"):
        raise _fail("--device is auto, cpu or cuda")
    if out.suffix.lower() not in (".jsonl", ".csv"):
        raise _fail("--out must end in .jsonl or .csv")
    if outside_population not in ("refuse", "flag"):
        raise _fail("--outside-population is refuse or flag")
    try:
        inputs = _collect_inputs(paths)
        path, version = resolve_model_ref(model)
        runner = OnnxModel(
            path, device=device, threads=threads or None, expected_sha256=sha256, version=version
        )
        heat_dir = out.parent / f"{out.stem}_heatmaps" if heatmaps else None
        qc = QCConfig(population=outside_population)  # type: ignore[arg-type]
        scorer = Scorer(runner, qc, heatmap_dir=heat_dir, batch_size=batch_size)
    except (FileNotFoundError, ValueError, ModelIntegrityError) as exc:
        raise _fail(str(exc)) from None
    if not any(p.exists() for p in inputs):
        raise _fail("no input files found: " + ", ".join(str(p) for p in paths))
    if runner.fallback:
        typer.secho("CUDA was requested but is unavailable: scoring on CPU", err=True, fg="yellow")
    counts: dict[str, int] = {}
    try:
        writer = FindingsWriter(out, runner.labels)
    except OSError as exc:
        raise _fail(f"cannot write {out}: {exc}") from None
    with writer, tqdm(total=len(inputs), unit="study", disable=None) as bar:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            data, names, unreadable = [], [], {}
            for k, f in enumerate(chunk):
                try:
                    data.append(f.read_bytes())
                    # heatmaps are named by content, so reruns into the same folder never mix
                    names.append(hashlib.sha256(data[-1]).hexdigest()[:16])
                except FileNotFoundError:
                    unreadable[k] = ("not_found", "The file does not exist.")
                except OSError as exc:
                    unreadable[k] = ("unreadable", str(exc.strerror or exc))
            results = iter(scorer.score_many(data, names))
            for k, f in enumerate(chunk):
                if k in unreadable:
                    code, message = unreadable[k]
                    record = {"status": "failed", "code": code, "message": message}
                else:
                    record = next(results).as_dict()
                counts[record["status"]] = counts.get(record["status"], 0) + 1
                if record["status"] == "scored" and record.get("flags"):  # no call
                    counts["flagged (no call)"] = counts.get("flagged (no call)", 0) + 1
                writer.write(str(f), record)
            bar.update(len(chunk))
    flagged = counts.pop("flagged (no call)", 0)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    if flagged:
        summary += f" ({flagged} of them scored with a flag and no call)"
    typer.echo(f"{len(inputs)} inputs: {summary}; provider {runner.provider} -> {out}")


ServeConfigOption = Annotated[Path, typer.Option("--config", "-c", help="service config (YAML)")]


def _serve_config(config: Path, overrides: list[str] | None) -> Any:
    from pydantic import ValidationError

    from diagnostics.configio import ConfigError, apply_overrides, load_yaml, validation_lines
    from diagnostics.serve.config import ServeConfig

    try:
        if not config.is_file() and config != Path("configs/serve.yaml"):
            raise ConfigError(f"{config} not found")
        # Without the default file (run outside the project), the embedded defaults apply.
        raw = apply_overrides(load_yaml(config) if config.is_file() else {}, overrides or [])
        return ServeConfig.model_validate(raw)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    except ValidationError as exc:
        where = f"{config} with --set" if overrides else str(config)
        raise _fail(f"{where}:\n{validation_lines(exc)}") from None


def _open_store(cfg: Any) -> Any:
    from diagnostics.serve.store import Store
    from diagnostics.settings import get_settings

    home = get_settings().home
    data_dir = cfg.resolved_data_dir(home)
    store = Store(cfg.resolved_database_url(home), data_dir / "blobs")
    store.migrate()
    return store, data_dir


def _service_model_cache(cfg: Any) -> Path:
    from diagnostics.settings import get_settings

    return cfg.resolved_data_dir(get_settings().home) / "model-cache"


def _load_service_model(cfg: Any) -> Any:
    from diagnostics.serve.runner import ModelIntegrityError, OnnxModel

    try:
        path, version = resolve_model_ref(cfg.model.path, _service_model_cache(cfg))
        return OnnxModel(
            path,
            device=cfg.model.device,
            threads=cfg.model.threads or None,
            expected_sha256=cfg.model.sha256,
            version=version,
        )
    except FileNotFoundError as exc:
        if cfg.model.path.startswith("models:/"):  # the registry said why
            raise _fail(f"model {cfg.model.path}: {exc}") from None
        raise _fail(
            f"model {cfg.model.path}: {exc} (train one with `make demo`, or set model.path)"
        ) from None
    except (ValueError, ModelIntegrityError) as exc:
        raise _fail(f"model {cfg.model.path}: {exc}") from None


def _check_port_free(host: str, port: int) -> None:
    """Fail before loading anything (or starting a worker) when the address is taken."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As uvicorn binds: connections of a previous run left in TIME_WAIT must not block a
        # restart (a supervisor restarting after a crash); a live listener still does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _model_source(cfg: Any) -> Any:
    """For a registry URI: a source the service polls, returning a new (file, version) when the
    alias (or `latest`) points elsewhere. A plain file never changes under the service."""
    ref = cfg.model.path
    if not ref.startswith("models:/"):
        return None
    client = _registry_client(_service_model_cache(cfg))
    if client is not None:  # a tracking server: followed over REST, without mlflow
        return client.follow(ref)

    def source(current: str | None) -> tuple[Path, str | None] | None:
        evaluate = _local_registry()
        registry_version, resolve_model = evaluate.registry_version, evaluate.resolve_model

        version = registry_version(ref)
        if version is None or version == current:
            return None
        return resolve_model(
            f"models:/{ref[len('models:/') :].split('@')[0].split('/')[0]}/{version}"
        ), version

    return source


@app.command()
def serve(
    config: ServeConfigOption = Path("configs/serve.yaml"),
    set_: SetOption = None,
    host: Annotated[str | None, typer.Option(help="overrides the config's host")] = None,
    port: Annotated[int | None, typer.Option(help="overrides the config's port")] = None,
    dev: Annotated[
        bool, typer.Option("--dev", help="allow auth: false, on a loopback address only")
    ] = False,
) -> None:
    """Run the clinic scoring service (FastAPI + uvicorn), with its worker in-process."""
    import uvicorn

    from diagnostics.serve import logs
    from diagnostics.serve.app import create_app
    from diagnostics.serve.config import check_auth_setting
    from diagnostics.serve.server import uvicorn_config

    cfg = _serve_config(config, set_)
    if host is not None:
        cfg.host = host
    if port is not None:
        cfg.port = port
    try:
        check_auth_setting(cfg, dev)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    _check_port_free(cfg.host, cfg.port)
    logs.configure()
    model = _load_service_model(cfg)
    store, data_dir = _open_store(cfg)
    api = create_app(cfg, model, store, data_dir, _model_source(cfg))
    uvicorn.Server(uvicorn_config(api, cfg, host=cfg.host, port=cfg.port)).run()


@app.command()
def worker(
    config: ServeConfigOption = Path("configs/serve.yaml"),
    set_: SetOption = None,
) -> None:
    """Run a scoring worker on its own, against the service's database and blob store."""
    import signal
    import threading

    from diagnostics.serve import logs
    from diagnostics.serve.models import ModelHolder
    from diagnostics.serve.monitor import AlertLog
    from diagnostics.serve.worker import Worker

    cfg = _serve_config(config, set_)
    logs.configure()
    model = _load_service_model(cfg)
    store, data_dir = _open_store(cfg)
    holder = ModelHolder(model, cfg, data_dir / "heatmaps", _model_source(cfg))
    w = Worker(
        store,
        holder,
        lease_s=cfg.worker.lease_s,
        batch_size=cfg.model.batch_size,
        poll_s=cfg.worker.poll_s,
        retry_delay_s=cfg.worker.retry_delay_s,
        alerts=AlertLog(store, cfg.monitor),
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if holder.source is not None and cfg.model.refresh_s > 0:
        threading.Thread(target=holder.run, args=(stop, cfg.model.refresh_s), daemon=True).start()
    w.run(stop)


def _check_key_id(key_id: str) -> None:
    if key_id.startswith("dk_"):  # never echo a secret back
        raise _fail("give the key ID (key_..., from `keys list`), not the key itself")


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="submitter, reviewer or admin")],
    clinic: Annotated[
        list[str] | None,
        typer.Option(help="submitter: its clinic; reviewer: clinics it may see (repeatable)"),
    ] = None,
    label: Annotated[str, typer.Option(help="who holds the key, for people")] = "",
    config: ServeConfigOption = Path("configs/serve.yaml"),
) -> None:
    """Create an API key. The key is printed once; only its hash is stored."""
    clinics = clinic or []
    if role == "submitter" and len(clinics) != 1:
        raise _fail("a submitter key belongs to exactly one clinic: give one --clinic")
    if role == "admin" and clinics:
        raise _fail("an admin key sees every clinic: --clinic does not apply")
    store, _ = _open_store(_serve_config(config, None))
    try:
        row, key = store.create_key(
            role,
            clinic=clinics[0] if role == "submitter" else None,
            scope=clinics if role == "reviewer" else None,
            label=label,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{row.id}  role={row.role}  clinics={','.join(clinics) or 'all'}")
    typer.echo(key)
    typer.secho("Store this key now: it is not shown again.", err=True, fg="yellow")


@keys_app.command("list")
def keys_list(config: ServeConfigOption = Path("configs/serve.yaml")) -> None:
    """Key IDs, roles, clinics and state (never the keys themselves)."""
    store, _ = _open_store(_serve_config(config, None))
    for k in store.list_keys():
        clinics = k.clinic_id or ",".join(k.scope or []) or "all"
        state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
        typer.echo(f"{k.id}\t{k.role}\t{clinics}\t{state}\t{k.label}")


@keys_app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="the key ID (key_...)")],
    config: ServeConfigOption = Path("configs/serve.yaml"),
) -> None:
    """Replace a key: a new key with the same role and clinics; the old one is revoked."""
    _check_key_id(key_id)
    store, _ = _open_store(_serve_config(config, None))
    try:
        row, key = store.rotate_key(key_id)
    except (KeyError, ValueError) as exc:
        raise _fail(str(exc).strip("'")) from None
    typer.echo(f"{row.id}  replaces {key_id} (revoked)")
    typer.echo(key)
    typer.secho("Store this key now: it is not shown again.", err=True, fg="yellow")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key ID (key_...)")],
    config: ServeConfigOption = Path("configs/serve.yaml"),
) -> None:
    """Revoke a key at once."""
    _check_key_id(key_id)
    store, _ = _open_store(_serve_config(config, None))
    try:
        store.revoke_key(key_id)
    except KeyError as exc:
        raise _fail(str(exc).strip("'")) from None
    typer.echo(f"{key_id} revoked")


@users_app.command("create")
def users_create(
    username: Annotated[str, typer.Argument(help="sign-in name")],
    role: Annotated[str, typer.Option(help="reviewer or admin")] = "reviewer",
    clinic: Annotated[
        list[str] | None, typer.Option(help="clinics a reviewer may see (repeatable)")
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from standard input")
    ] = False,
    config: ServeConfigOption = Path("configs/serve.yaml"),
) -> None:
    """Create a review-page account. The password is asked for (or read from stdin) and
    stored as an argon2 hash."""
    import sys

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    store, _ = _open_store(_serve_config(config, None))
    try:
        store.create_reviewer(username, password, role=role, scope=clinic or [])
    except ValueError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"user {username} ({role}) created")


@app.command()
def report(
    study_id: Annotated[str, typer.Argument(help="the study ID")],
    format: Annotated[str, typer.Option(help="fhir or text")] = "fhir",
    lang: Annotated[str, typer.Option(help="vi or en")] = "vi",
    out: Annotated[Path | None, typer.Option(help="write here instead of stdout")] = None,
    config: ServeConfigOption = Path("configs/serve.yaml"),
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
            fhir_report(view, lang, study.sop_instance_uid), indent=2, ensure_ascii=False
        )
    else:
        text = text_report(view, lang)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n", encoding="utf-8")
        typer.echo(f"wrote {out}")


@reviews_app.command("export")
def reviews_export(
    out: Annotated[Path, typer.Option(help="manifest CSV for `train cxr` (source: manifest)")],
    since: Annotated[str | None, typer.Option(help="ISO date: studies received since")] = None,
    clinic: Annotated[str | None, typer.Option(help="one clinic only")] = None,
    config: ServeConfigOption = Path("configs/serve.yaml"),
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


@models_app.command("list")
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


@models_app.command("compare")
@_training
def models_compare(
    candidate: Annotated[str, typer.Argument(help="models:/NAME/VERSION, @ALIAS or a .onnx")],
    baseline: Annotated[str, typer.Argument(help="the model to compare against")],
    config: Annotated[Path, typer.Option("--config", "-c", help="evaluation dataset config")],
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
    set_: SetOption = None,
) -> None:
    """Both models on the same images: AUROC difference (paired bootstrap, DeLong),
    calibration, operating points, disagreements, subgroups; logged to MLflow. Images the
    clinic's QC would withhold from either model are counted, not compared."""
    from diagnostics.data.cxr import DatasetError
    from diagnostics.train.governance import compare

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


@models_app.command("promote")
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


@models_app.command("recalibrate")
@_training
def models_recalibrate(
    model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or .onnx")],
    config: Annotated[Path, typer.Option("--config", "-c", help="the site's labelled data")],
    site: Annotated[str, typer.Option(help="the clinic code the profile applies to")],
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
    ] = Path("configs/serve.yaml"),
    set_: SetOption = None,
) -> None:
    """Fit a site's temperature and thresholds (or, with --population, its population-check
    threshold); store them as a site profile for this model file. The service applies it to
    that site's studies; the ONNX file is not changed. A new profile keeps the site's other
    settings from its previous one."""
    from diagnostics.data.cxr import DatasetError
    from diagnostics.train.governance import actor
    from diagnostics.train.recalibrate import SampleTooSmall, recalibrate, recalibrate_population

    try:
        path, _ = resolve_model_ref(model)
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
    previous = store.site_profile(result["model_sha256"], site)
    if population:
        e = result["evidence"]
        row = store.save_profile(
            model_sha256=result["model_sha256"],
            site=site,
            temperatures=previous.temperatures if previous else {},
            thresholds=previous.thresholds if previous else {},
            policy=previous.policy if previous else "model's own",
            evidence={**(previous.evidence if previous else {}), "population": e},
            population_threshold=result["population_threshold"],
            created_by=actor()[:64],
        )
        typer.echo(
            f"population check: n={e['n']} in-population images of {site}; threshold "
            f"{e['model_threshold']:.3f} -> {result['population_threshold']:.3f}; refused "
            f"{100 * e['refused_before']:.1f}% -> {100 * e['refused_after']:.1f}% of them"
        )
        if result["population_threshold"] < e["model_threshold"]:
            typer.echo(
                "  note: a lower threshold lets more patients outside the population through "
                "(at the model's own threshold it refused "
                f"{100 * (e['model_outside_refused'] or float('nan')):.1f}% of held-out outside "
                "images); check a sample of the site's adults with `diagnostics evaluate`"
            )
        typer.echo(f"site profile {row.id} for {site}, model sha256 {result['model_sha256'][:12]}")
        return
    row = store.save_profile(
        model_sha256=result["model_sha256"],
        site=site,
        temperatures=result["temperatures"],
        thresholds=result["thresholds"],
        policy=result["policy"],
        evidence=result["evidence"],
        population_threshold=previous.population_threshold if previous else None,
        created_by=actor()[:64],
    )
    for f, e in result["evidence"].items():
        b, a = e["before"], e["after"]
        typer.echo(
            f"{f}: n={e['n']} ({e['positives']} positive), policy {e['policy']}: "
            f"threshold {e['model_threshold']:.3f} -> {result['thresholds'][f]:.3f}, "
            f"temperature {e['model_temperature']:.2f} -> {result['temperatures'][f]:.2f}; "
            f"sensitivity {b['sensitivity']:.3f} -> {a['sensitivity']:.3f}, "
            f"specificity {b['specificity']:.3f} -> {a['specificity']:.3f}"
        )
    typer.echo(f"site profile {row.id} for {site}, model sha256 {result['model_sha256'][:12]}")


@models_app.command("rollback")
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


@models_app.command("pull")
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
        path, version = resolve_model_ref(model)
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


@app.command()
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


@app.command()
@_training
def demo(
    n: Annotated[int, typer.Option("--n", min=10)] = 1200,
    size: Annotated[int, typer.Option("--size", min=32)] = 128,
    difficulty: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.7,
    train: Annotated[bool, typer.Option(help="train after checking the data")] = True,
) -> None:
    """End to end on built-in data: synthetic CXR (generate, check, train, evaluate, export,
    register), then a risk model on scikit-learn's bundled breast-cancer table (train, register,
    score records)."""
    from diagnostics.data.check import render, summarize
    from diagnostics.data.cxr import load_dataset
    from diagnostics.data.synthetic import write_dataset
    from diagnostics.settings import get_settings

    home = get_settings().home
    out = home / "demo" / "synth"
    config = Path("configs/cxr/demo.yaml")
    if not config.is_file():
        raise _fail(f"{config} not found: run the demo from the project root")
    typer.echo(
        f"[1/4] synthetic chest X-rays: {n} images at {size} px, difficulty {difficulty} -> {out}"
    )
    manifest = write_dataset(out, n, size=size, seed=0, difficulty=difficulty)
    # images from outside the demo model's population: its population check trains against them
    outside = write_dataset(
        home / "demo" / "synth_outside", max(n // 4, 40), size=size, seed=1, habitus="broad"
    )
    overrides = [
        f"data.labels_file={manifest}",
        f"preprocess.size={size}",
        f"population.check.outside.labels_file={outside}",
    ]
    cfg = load_data_config(config, [o for o in overrides if o.startswith("data.")])
    typer.echo(f"[2/4] data check ({config})")
    typer.echo(render(summarize(load_dataset(cfg))))
    if not train:
        return
    from diagnostics.train.cxr import train_cxr
    from diagnostics.train.evaluate import evaluate as run_eval

    typer.echo("[3/4] train, calibrate, export to ONNX, log and register in MLflow")
    result = train_cxr(_load_train_config(config, overrides))
    typer.echo(_summary_table(result))
    typer.echo("[4/4] evaluate the exported ONNX file on the test split (ONNX Runtime)")
    report = run_eval(result.onnx_path, cfg, split="test", n_boot=200, progress=False)
    qc = report["qc"]
    typer.echo(
        f"{qc['scored_with_a_call']} of {qc['images']} test images scored with a call"
        + (f"; withheld: {qc['withheld_by_reason']}" if qc["withheld"] else "")
    )
    typer.echo(
        "test AUROC: "
        + ", ".join(f"{f} {r['auroc']:.3f}" for f, r in report["findings"].items())
        + f"; mean {report['mean_auroc'] or float('nan'):.4f}"
    )
    _demo_score(result.onnx_path, manifest, home)
    _demo_risk(home)
    typer.echo(_mlflow_ui_hint())


def _demo_score(model: Path, manifest: Path, home: Path) -> None:
    """Score a few images as a clinic would (QC, findings, heatmaps), and three a clinic
    should not send: a blank image, a child (by DICOM age) and another body habitus."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    from diagnostics.data.synthetic import SynthSpec, dicom_dataset, generate, to_stored
    from diagnostics.serve.runner import OnnxModel, Scorer

    typer.echo(
        "[score] three demo images, and three a clinic should not send: a blank image, a "
        "10-year-old (DICOM PatientAge 010Y; the demo model is for adults) and a body the model "
        "was not trained on (a broad-habitus PNG, no age: the model's own checks decide)"
    )
    paths = pd.read_csv(manifest)["path"].head(3).tolist()
    blank = io.BytesIO()
    Image.fromarray(np.full((128, 128), 90, np.uint8)).save(blank, "PNG")
    items = [(Path(p).name, (manifest.parent / p).read_bytes()) for p in paths]
    items.append(("blank.png", blank.getvalue()))
    spec = SynthSpec(size=128)
    child = generate(1, spec, seed=99)[0][1].pixels
    ds = dicom_dataset(
        to_stored(child, 12, "MONOCHROME2"),
        bits=12,
        photometric="MONOCHROME2",
        uid_seed="demo-child",
    )
    ds.PatientAge = "010Y"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    items.append(("child.dcm", buf.getvalue()))
    broad = generate(1, spec, seed=98, habitus="broad")[0][1].pixels
    png = io.BytesIO()
    Image.fromarray(np.round(broad * 255).astype(np.uint8)).save(png, "PNG")
    items.append(("broad.png", png.getvalue()))
    heat = home / "demo" / "heatmaps"
    scorer = Scorer(OnnxModel(model), heatmap_dir=heat)
    results = scorer.score_many([d for _, d in items], [Path(n).stem for n, _ in items])
    for (name, _), r in zip(items, results, strict=True):
        if r.status == "scored":
            calls = ", ".join(
                f"{f.label} {f.probability:.2f}{'+' if f.positive else ''}" for f in r.findings
            )
            typer.echo(f"  {name}: scored in {r.timing_ms['total']:.0f} ms: {calls}")
        else:
            typer.echo(f"  {name}: {r.status} [{r.code}] {r.message}")
    typer.echo(f"  ('+' = positive; CAM overlays for positives in {heat})")


def _demo_risk(home: Path) -> None:
    """The risk half of the demo: bundled breast-cancer data, train, register, score records."""
    from diagnostics.serve.risk import RiskModel
    from diagnostics.train.risk import load_risk_config, load_source, train_risk

    config = Path("configs/risk/breast_cancer_demo.yaml")
    typer.echo(f"[risk 1/2] train a calibrated risk model ({config})")
    result = train_risk(load_risk_config(config))
    typer.echo(_risk_summary(result))
    typer.echo("[risk 2/2] score records (one implausible, one with a missing value)")
    table = load_source("sklearn:breast_cancer")
    # two malignant and three benign masses (rows 3 and 4 are then altered)
    picked = list(table.index[table["malignant"] == 1][:2]) + list(
        table.index[table["malignant"] == 0][:3]
    )
    records = table.loc[picked].drop(columns="malignant").reset_index(drop=True)
    records.loc[3, "mean_radius"] = 500.0
    records.loc[4, "mean_texture"] = None
    scored = RiskModel(result.onnx_path).score(records)
    out = home / "demo" / "risk_scores.csv"
    scored.to_csv(out, index=False)
    typer.echo(
        scored[["row", "status", "risk", "category", "imputed", "reasons"]].to_string(index=False)
    )
    typer.echo(f"wrote {out}")
