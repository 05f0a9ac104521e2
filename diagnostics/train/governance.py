"""Model governance on the MLflow registry: list, compare, promote behind a gate, roll back.

Every promotion and rollback is written on the registered model as a JSON history tag
(`alias_history`: who, when, alias, from which version to which, the evidence run) and on the
promoted version's tags, so it can be undone and audited. The clinic side only ever follows
the alias (`models:/NAME@champion`).
"""

from __future__ import annotations

import getpass
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from diagnostics.contract import is_positive
from diagnostics.serve.qc import QCConfig
from diagnostics.settings import get_settings

HISTORY_TAG = "alias_history"


def _client() -> Any:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(get_settings().mlflow_uri())
    return MlflowClient()


def actor() -> str:
    return os.environ.get("DIAGNOSTICS_USER") or getpass.getuser()


# --------------------------------------------------------------------------- list


def list_models() -> list[dict[str, Any]]:
    """Every registered version: aliases, sha256, run, dataset digest, headline metric."""
    client = _client()
    rows = []
    for rm in client.search_registered_models():
        aliases: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for mv in sorted(
            client.search_model_versions(f"name='{rm.name}'"), key=lambda v: int(v.version)
        ):
            run = client.get_run(mv.run_id) if mv.run_id else None
            metrics = run.data.metrics if run else {}
            digest = None
            if run and run.inputs and run.inputs.dataset_inputs:
                digest = run.inputs.dataset_inputs[0].dataset.digest
            rows.append(
                {
                    "name": rm.name,
                    "version": str(mv.version),
                    "aliases": sorted(aliases.get(str(mv.version), [])),
                    "sha256": (run.data.tags.get("onnx_sha256") if run else None),
                    "run_id": mv.run_id,
                    "dataset_digest": digest,
                    "val_mean_auroc": metrics.get("val.mean_auroc"),
                    "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(
                        timespec="seconds"
                    ),
                }
            )
    return rows


# --------------------------------------------------------------------------- compare


def compare(
    candidate: str,
    baseline: str,
    data_cfg: Any,
    *,
    split: str = "val",
    subgroups: list[str] | None = None,
    n_boot: int = 1000,
    out_dir: Path,
    log: bool = True,
    population_check: bool = True,
    qc_config: Any = None,
) -> dict[str, Any]:
    """Both models on the same images; report (JSON + markdown) written to `out_dir` and, with
    `log`, to an MLflow evaluation run tagged with both model versions.

    With `population_check` (the default) the images are those both models would score with a
    call at the clinic (input QC, intended population, OOD); the others are counted per model
    under `dataset.withheld`, never compared."""
    from diagnostics.data.cxr import load_dataset
    from diagnostics.serve.runner import OnnxModel
    from diagnostics.train.compare import (
        compare_finding,
        json_dump,
        render_markdown,
        study_key,
    )
    from diagnostics.train.evaluate import registry_version, resolve_model, score_paths
    from diagnostics.train.metrics import auroc

    runners, infos = [], []
    for ref in (candidate, baseline):
        path = resolve_model(ref)
        version = registry_version(ref) if ref.startswith("models:/") else None
        runner = OnnxModel(path, version=version)
        runners.append(runner)
        infos.append(
            {
                "label": ref,
                "sha256": runner.sha256,
                "version": version,
                "name": runner.metadata.name,
            }
        )
    table = load_dataset(data_cfg)
    frame = table.frame if split == "all" else table.frame[table.frame["split"] == split]
    if frame.empty:
        raise ValueError(f"split {split!r} is empty")
    withheld: dict[str, Any] = {}
    if population_check:
        from diagnostics.serve.runner import Scorer
        from diagnostics.train.evaluate import clinic_verdicts, qc_summary

        keep = np.ones(len(frame), dtype=bool)
        for name, runner in zip(("candidate", "baseline"), runners, strict=True):
            scorer = Scorer(runner, qc_config)
            verdicts = clinic_verdicts(scorer, frame["path"].tolist(), progress=False)
            keep &= np.array([v["status"] == "scored" and not v["flags"] for v in verdicts])
            withheld[name] = qc_summary(verdicts, True)["withheld_by_reason"]
        frame = frame[keep]
        if frame.empty:
            raise ValueError("the clinic's QC withholds every image from one model or the other")
    paths = frame["path"].tolist()
    probs = [score_paths(r, paths)[0] for r in runners]
    groups = frame["patient_id"].to_numpy() if "patient_id" in frame else None
    keys = [
        study_key(p, sid)
        for p, sid in zip(
            paths,
            frame["study_id"] if "study_id" in frame else [None] * len(paths),
            strict=True,
        )
    ]
    findings = [f for f in runners[0].labels if f in runners[1].labels and f in table.findings]
    if not findings:
        raise ValueError("the two models and the dataset share no finding")
    report: dict[str, Any] = {
        "candidate": infos[0],
        "baseline": infos[1],
        "dataset": {
            "name": table.source,
            "split": split,
            "images": len(frame),  # compared: both models would score them with a call
            "population_check": population_check,
            "withheld": withheld,
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "findings": {},
        "subgroups": {},
    }
    for f in findings:
        i, j = runners[0].labels.index(f), runners[1].labels.index(f)
        y = frame[f].to_numpy(dtype=float)
        tc = runners[0].metadata.thresholds[f].value
        tb = runners[1].metadata.thresholds[f].value
        r = compare_finding(y, probs[0][:, i], probs[1][:, j], tc, tb, groups, n_boot)
        calls_c, calls_b = is_positive(probs[0][:, i], tc), is_positive(probs[1][:, j], tb)
        r["disagreements"] = [keys[k] for k in np.flatnonzero(calls_c != calls_b)]
        report["findings"][f] = r
    for col in subgroups or []:
        if col not in frame:
            raise ValueError(f"subgroup column {col!r} is not in the dataset")
        per: dict[str, Any] = {}
        for value in sorted(frame[col].dropna().astype(str).unique()):
            mask = (frame[col].astype(str) == value).to_numpy()
            per[value] = {}
            for f in findings:
                i, j = runners[0].labels.index(f), runners[1].labels.index(f)
                y = frame[f].to_numpy(dtype=float)[mask]
                per[value][f] = {
                    "n": int(np.isfinite(y).sum()),
                    "candidate_auroc": auroc(y, probs[0][mask, i]),
                    "baseline_auroc": auroc(y, probs[1][mask, j]),
                }
        report["subgroups"][col] = per
    out_dir.mkdir(parents=True, exist_ok=True)
    json_dump(report, out_dir / "compare.json")
    (out_dir / "compare.md").write_text(render_markdown(report))
    if log:
        report["evidence_run"] = _log_compare(report, out_dir)
        json_dump(report, out_dir / "compare.json")
    return report


def _log_compare(report: dict[str, Any], out_dir: Path) -> str:
    import mlflow

    from diagnostics.train import tracking

    settings = get_settings()
    exp = tracking.setup(settings.mlflow_uri(), "model-compare", settings.artifact_root)
    c, b = report["candidate"], report["baseline"]
    with mlflow.start_run(
        experiment_id=exp, run_name=f"compare {c['label']} vs {b['label']}"
    ) as run:
        mlflow.set_tags(
            {
                "diagnostics.kind": "compare",
                "candidate": c["label"],
                "candidate_version": str(c["version"]),
                "candidate_sha256": c["sha256"],
                "baseline": b["label"],
                "baseline_version": str(b["version"]),
                "baseline_sha256": b["sha256"],
                "dataset": report["dataset"]["name"],
                "split": report["dataset"]["split"],
            }
        )
        flat, undefined = {}, {}
        for f, r in report["findings"].items():
            for who in ("candidate", "baseline"):
                for k, v in r[who].items():
                    if isinstance(v, float) and np.isfinite(v):
                        flat[f"{f}.{who}.{k}"] = v
                if r[who].get("calibration_note"):  # no metric: a tag that says why
                    undefined[f"{f}.{who}.calibration_slope"] = (
                        f"undefined: {r[who]['calibration_note']}"
                    )
            for k in ("auroc_diff", "delong_p"):
                if np.isfinite(r[k]):
                    flat[f"{f}.{k}"] = r[k]
            if np.isfinite(r["auroc_diff_ci"][0]):
                flat[f"{f}.auroc_diff_lo"] = r["auroc_diff_ci"][0]
                flat[f"{f}.auroc_diff_hi"] = r["auroc_diff_ci"][1]
        mlflow.log_metrics(flat)
        if undefined:
            mlflow.set_tags(undefined)
        mlflow.log_artifact(str(out_dir / "compare.md"))
        mlflow.log_artifact(str(out_dir / "compare.json"))
        return run.info.run_id


# --------------------------------------------------------------------------- gate, promote


class Gate(BaseModel):
    """Rules a candidate must pass to take an alias. Missing rules are not checked."""

    model_config = ConfigDict(extra="forbid")

    data: dict[str, Any]  # the evaluation dataset config (a `data:` section)
    split: str = "val"
    bootstrap: int = Field(1000, ge=0)
    # AUROC may be worse than the champion's by at most this much, on the bootstrap lower bound
    # of (candidate - champion), for every shared finding.
    auroc_margin: float | None = Field(None, ge=0)
    min_sensitivity: float | None = Field(None, ge=0, le=1)
    min_specificity: float | None = Field(None, ge=0, le=1)
    max_ece: float | None = Field(None, ge=0, le=1)
    # The candidate's calibration slope lies in [low, high] for every shared finding, e.g.
    # [0.8, 1.25]. An undefined slope (one class, a constant score, classes separated
    # perfectly) fails the rule and says why.
    calibration_slope: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _slope_bounds(self) -> Gate:
        if self.calibration_slope is not None:
            low, high = self.calibration_slope
            if not 0 < low <= high:
                raise ValueError("calibration_slope is [low, high] with 0 < low <= high")
        return self

    require_parity: bool = True  # the training run logged an ONNX parity check
    require_qc_reference: bool = True  # the model carries an OOD reference for input QC
    # The model states its intended population and its population check, measured at training,
    # refused at least this share of the held-out outside images (e.g. adults).
    min_outside_refused: float | None = Field(None, ge=0, le=1)
    # The clinic's input QC (serve.yaml `qc:`): images it would withhold are not compared.
    qc: QCConfig = Field(default_factory=QCConfig)


def load_gate(path: Path) -> Gate:
    return Gate.model_validate(yaml.safe_load(path.read_text()))


def check_gate(
    gate: Gate,
    report: dict[str, Any] | None,
    parity: float | None,
    has_qc: bool,
    population: Any = None,
) -> list[tuple[str, bool, str]]:
    """(rule, passed, detail) for every rule of the gate. `population`: the candidate's
    `contract.Population`, or None."""
    out: list[tuple[str, bool, str]] = []
    if gate.require_parity:
        ok = parity is not None and parity <= 1e-4
        out.append(("onnx_parity", ok, f"recorded max |dp| {parity}"))
    if gate.require_qc_reference:
        out.append(("qc_reference", has_qc, "OOD reference in metadata" if has_qc else "none"))
    if gate.min_outside_refused is not None:
        check = population.check if population is not None else None
        refused = check.metrics.get("outside_refused") if check is not None else None
        ok = refused is not None and refused >= gate.min_outside_refused
        detail = (
            f"{100 * refused:.1f}% of held-out outside images refused ({population.age_text()})"
            if refused is not None
            else "no population check in the model"
        )
        out.append((f"population check refuses >= {gate.min_outside_refused:.0%}", ok, detail))
    if report is None:
        return out
    for f, r in report["findings"].items():
        c = r["candidate"]
        if gate.auroc_margin is not None and report["baseline"]["label"] != "(none)":
            lo = r["auroc_diff_ci"][0]
            ok = bool(np.isfinite(lo) and lo >= -gate.auroc_margin)
            out.append(
                (
                    f"{f}: AUROC not worse than champion by > {gate.auroc_margin}",
                    ok,
                    f"diff {r['auroc_diff']:+.4f}, 95% CI lower bound {lo:+.4f}",
                )
            )
        if gate.min_sensitivity is not None:
            ok = bool(c["sensitivity"] >= gate.min_sensitivity)
            out.append(
                (f"{f}: sensitivity >= {gate.min_sensitivity}", ok, f"{c['sensitivity']:.3f}")
            )
        if gate.min_specificity is not None:
            ok = bool(c["specificity"] >= gate.min_specificity)
            out.append(
                (f"{f}: specificity >= {gate.min_specificity}", ok, f"{c['specificity']:.3f}")
            )
        if gate.max_ece is not None:
            ok = bool(c["ece"] <= gate.max_ece)
            out.append((f"{f}: ECE <= {gate.max_ece}", ok, f"{c['ece']:.3f}"))
        if gate.calibration_slope is not None:
            out.append(_slope_rule(f, c, gate.calibration_slope))
    return out


def _slope_rule(
    finding: str, c: dict[str, Any], bounds: tuple[float, float]
) -> tuple[str, bool, str]:
    """The calibration-slope rule of one finding. NaN (or null, read back from JSON) is an
    undefined slope: it fails, with the reason the fit gave."""
    low, high = bounds
    rule = f"{finding}: calibration slope in [{low:g}, {high:g}]"
    slope = c.get("calibration_slope")
    if slope is None or not np.isfinite(slope):
        why = c.get("calibration_note") or "not computed"
        return (rule, False, f"undefined ({why}): calibration cannot be judged")
    return (rule, bool(low <= slope <= high), f"{slope:.2f}")


def _name_version(ref: str) -> tuple[str, str]:
    if not ref.startswith("models:/"):
        raise ValueError("give a registry URI: models:/NAME/VERSION or models:/NAME@ALIAS")
    from diagnostics.train.evaluate import registry_version

    body = ref[len("models:/") :]
    name = body.split("@")[0].split("/")[0]
    version = registry_version(ref)
    if version is None:
        raise ValueError(f"{ref}: no such version")
    return name, version


def _history(client: Any, name: str) -> list[dict[str, Any]]:
    tags = client.get_registered_model(name).tags or {}
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def _record(client: Any, name: str, entry: dict[str, Any]) -> None:
    history = [*_history(client, name), entry]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def promote(
    candidate: str, alias: str, gate: Gate, *, out_dir: Path, dry_run: bool = False
) -> dict[str, Any]:
    """Compare with the current holder of `alias`, check the gate, move the alias if every
    rule passes. Returns {"promoted", "rules", "evidence_run", "previous"}."""
    from diagnostics.data.config import parse_dataset_config
    from diagnostics.serve.runner import OnnxModel
    from diagnostics.train.evaluate import resolve_model

    client = _client()
    name, version = _name_version(candidate)
    try:
        previous = str(client.get_model_version_by_alias(name, alias).version)
    except Exception:
        previous = None
    if previous == version:
        raise ValueError(f"{name} version {version} already holds @{alias}")
    runner = OnnxModel(resolve_model(f"models:/{name}/{version}"))
    run = client.get_run(runner.metadata.run_id) if runner.metadata.run_id else None
    parity = run.data.metrics.get("onnx_parity_max_abs_diff") if run else None
    report = None
    needs_report = (
        gate.min_sensitivity is not None
        or gate.min_specificity is not None
        or gate.max_ece is not None
        or gate.calibration_slope is not None
    )
    if previous is not None or needs_report:
        baseline = f"models:/{name}/{previous}" if previous else f"models:/{name}/{version}"
        report = compare(
            f"models:/{name}/{version}",
            baseline,
            parse_dataset_config(gate.data),
            split=gate.split,
            n_boot=gate.bootstrap,
            out_dir=out_dir,
            qc_config=gate.qc,
        )
        if previous is None:
            report["baseline"]["label"] = "(none)"
    rules = check_gate(gate, report, parity, runner.ood is not None, runner.metadata.population)
    passed = all(ok for _, ok, _ in rules)
    evidence = report.get("evidence_run") if report else None
    if passed and not dry_run:
        client.set_registered_model_alias(name, alias, version)
        when = datetime.now(UTC).isoformat(timespec="seconds")
        entry = {
            "action": "promote",
            "alias": alias,
            "version": version,
            "previous": previous,
            "by": actor(),
            "at": when,
            "evidence_run": evidence,
        }
        _record(client, name, entry)
        for k, v in (
            ("promoted_to", alias),
            ("promoted_by", actor()),
            ("promoted_at", when),
            ("evidence_run", str(evidence)),
            ("previous_champion", str(previous)),
        ):
            client.set_model_version_tag(name, version, k, v)
    return {
        "name": name,
        "version": version,
        "promoted": passed and not dry_run,
        "rules": rules,
        "evidence_run": evidence,
        "previous": previous,
    }


def rollback(name: str, alias: str = "champion") -> dict[str, Any]:
    """Move `alias` back to the version it held before the latest promotion."""
    client = _client()
    history = [h for h in _history(client, name) if h["alias"] == alias]
    if not history:
        raise ValueError(f"no recorded promotion of {name}@{alias} to roll back")
    last = history[-1]
    current = str(client.get_model_version_by_alias(name, alias).version)
    target = last["previous"] if last["action"] == "promote" else None
    if last["action"] == "rollback":
        raise ValueError(f"the latest change of @{alias} was already a rollback; promote instead")
    when = datetime.now(UTC).isoformat(timespec="seconds")
    if target is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, target)
    _record(
        client,
        name,
        {
            "action": "rollback",
            "alias": alias,
            "version": target,
            "previous": current,
            "by": actor(),
            "at": when,
            "evidence_run": None,
        },
    )
    return {"name": name, "alias": alias, "from": current, "to": target}
