"""The `diagnostics` command line: the typer root and its command tree.

Each module holds a group of thin commands (parse options, call the library, print); heavy
modules are imported inside the commands, so `import diagnostics.cli` loads no torch, mlflow
or scikit-learn, and a clinic install runs every command that does not train.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from diagnostics.cli import data, demo, dicom, keys, models, reviews, score, serve, tracking, train
from diagnostics.cli.common import (
    TRAINING_MODULES,
    SetOption,
    _fail,
    _load_train_config,
    _open_store,
    _serve_config,
    _training,
    load_data_config,
)
from diagnostics.cli.registry import (
    _local_registry,
    _model_cache,
    _registry_client,
    resolve_model_ref,
)
from diagnostics.cli.serve import _check_port_free, _load_service_model, _model_source

__all__ = [
    "TRAINING_MODULES",
    "SetOption",
    "_check_port_free",
    "_fail",
    "_load_service_model",
    "_load_train_config",
    "_local_registry",
    "_model_cache",
    "_model_source",
    "_open_store",
    "_registry_client",
    "_serve_config",
    "_training",
    "app",
    "load_data_config",
    "resolve_model_ref",
]

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
app.add_typer(dicom.app, name="dicom")
tracking_app = typer.Typer(
    help="The team's MLflow tracking server (PostgreSQL, proxied artefacts).", no_args_is_help=True
)
app.add_typer(tracking_app, name="tracking")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# The command tree, in the order `--help` lists it.
data_app.command("check")(data.data_check)
data_app.command("synth-cxr")(data.data_synth_cxr)
train_app.command("cxr")(train.train_cxr_cmd)
train_app.command("risk")(train.train_risk_cmd)
app.command("score-risk")(score.score_risk)
app.command("score")(score.score)
app.command("serve")(serve.serve)
app.command("worker")(serve.worker)
keys_app.command("create")(keys.keys_create)
keys_app.command("list")(keys.keys_list)
keys_app.command("rotate")(keys.keys_rotate)
keys_app.command("revoke")(keys.keys_revoke)
users_app.command("create")(keys.users_create)
app.command("report")(reviews.report)
reviews_app.command("export")(reviews.reviews_export)
models_app.command("list")(models.models_list)
models_app.command("compare")(models.models_compare)
models_app.command("promote")(models.models_promote)
models_app.command("recalibrate")(models.models_recalibrate)
models_app.command("rollback")(models.models_rollback)
models_app.command("pull")(models.models_pull)
tracking_app.command("serve")(tracking.tracking_serve)
app.command("evaluate")(score.evaluate)
app.command("demo")(demo.demo)
