"""Model cards in markdown: what a reviewer reads next to the metrics.

CXR cards give intended use, data, metrics with CIs, thresholds and limitations; risk cards
follow the TRIPOD+AI headings.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diagnostics import __version__
from diagnostics.contract import ModelMetadata
from diagnostics.data.cxr import CXRTable
from diagnostics.tables import ValidatedTable
from diagnostics.train.metrics import calibration_text


def cxr_model_card(
    meta: ModelMetadata,
    val: dict[str, dict[str, float]],
    test: dict[str, dict[str, float]] | None,
    table: CXRTable,
    sha: str,
) -> str:
    """A short model card in markdown: intended use, data, metrics with CIs, thresholds, limits."""
    counts = table.frame["split"].value_counts().to_dict()
    lines = [
        f"# {meta.name}: {meta.architecture}",
        "",
        f"- ONNX sha256: `{sha}`",
        f"- Created: {meta.created} (diagnostics {meta.package_version})",
        f"- MLflow run: {meta.run_id}",
        "",
        "## Intended use",
        meta.intended_use or "-",
        "",
        *population_lines(meta),
        "## Data",
        f"- Dataset: {meta.dataset_name}; digest `{(meta.dataset_digest or '')[:16]}`",
        f"- Images per split: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}",
        f"- Input: {meta.preprocessing.size} px, {meta.preprocessing.channels} channel(s), "
        f"crop {meta.preprocessing.crop}, normalisation {meta.preprocessing.normalize}",
        "",
        "## Performance",
    ]
    for name, report in (("validation", val), ("test", test)):
        if not report:
            continue
        lines += [
            f"### {name}",
            "",
            "| finding | n | AUROC (95% CI) | threshold | sensitivity | specificity | ECE |",
            "|---|---|---|---|---|---|---|",
        ]
        for f, r in report.items():
            lines.append(
                f"| {f} | {int(r['n'])} "
                f"| {r['auroc']:.3f} ({r['auroc_lo']:.3f}-{r['auroc_hi']:.3f})"
                f" | {r['threshold']:.3f} | {r['sensitivity']:.3f} | {r['specificity']:.3f}"
                f" | {r['ece']:.3f} |"
            )
        lines.append("")
    lines += [
        f"Thresholds were chosen on validation by `{next(iter(meta.thresholds.values())).policy}`;"
        " temperatures were fitted on validation.",
        "",
        "## Limitations",
        meta.limitations
        or "Validated only on the splits above. Re-check calibration and "
        "thresholds on each site's own data before use.",
        "",
    ]
    return "\n".join(lines)


def population_lines(meta: ModelMetadata) -> list[str]:
    """The intended population section: who the model is for, and its measured check."""
    pop = meta.population
    if pop is None:
        return ["## Intended population", "Not stated: the clinic cannot enforce one.", ""]
    lines = [
        "## Intended population",
        f"- Ages: {pop.age_text()}"
        + (f" (`age_years` [{pop.age_years[0]:g}, {pop.age_years[1]:g}))" if pop.age_years else ""),
        f"- Modalities: {', '.join(pop.modalities)}; views: {', '.join(pop.views)}",
        f"- Training images: {pop.description or '-'}",
        "- At the clinic, QC refuses a patient outside this population before any score (or "
        "scores with a flag and no call, where a site chooses): by the DICOM age when there is "
        "one, else by the check below.",
    ]
    if pop.check is not None:
        m = pop.check.metrics
        lines += [
            f"- Population check: `{pop.check.output}` output, threshold "
            f"{pop.check.threshold:.3f}; {pop.check.rule}.",
            f"  Measured on images it never trained on: AUROC {m.get('auroc', float('nan')):.3f}; "
            f"refuses {100 * m.get('outside_refused', float('nan')):.1f}% of "
            f"{int(m.get('outside_held_images', 0))} held-out outside images and "
            f"{100 * m.get('inside_val_refused', float('nan')):.1f}% of "
            f"{int(m.get('inside_val_images', 0))} validation images.",
        ]
        groups = {k.split(".", 1)[1]: v for k, v in m.items() if k.startswith("outside_refused.")}
        if groups:
            lines.append(
                "  By group: "
                + ", ".join(f"{g} {100 * v:.1f}%" for g, v in sorted(groups.items()))
                + "."
            )
    return [*lines, ""]


def risk_model_card(cfg: Any, vt: ValidatedTable, doc: dict, sha: str) -> str:
    """Markdown along the TRIPOD+AI headings."""
    s = cfg.table_schema
    cv, te = doc["cv"], doc["test"]

    def ci(r: dict, k: str) -> str:
        return f"{r[k]:.3f} (95% CI {r[k + '_lo']:.3f}-{r[k + '_hi']:.3f})"

    lines = [
        f"# {cfg.tracking.registered_model or cfg.name}: {cfg.model.estimator} "
        f"+ {cfg.model.calibration} calibration",
        f"ONNX sha256 `{sha}`; diagnostics {__version__}",
        "",
        "## Source of data",
        s.description or cfg.table,
        f"Rows read {vt.rows_read}, used {len(vt.y)}, rejected {len(vt.rejected)}.",
        *_population_lines(s, doc.get("refusals") or {}),
        "",
        "## Outcome",
        f"{s.outcome.label}: `{s.outcome.column} {s.outcome.rule}`. "
        f"{s.outcome.description} Events: {int(vt.y.sum())} of {len(vt.y)}.",
        "",
        "## Predictors",
    ]
    for f in s.features:
        detail = [f.type] + ([f.unit] if f.unit else [])
        if f.range:
            detail.append(f"plausible {f.range[0]:g}-{f.range[1]:g}")
        if f.categories and f.type == "categorical":
            detail.append(
                "categories "
                + ", ".join(f"{c:g}" if isinstance(c, float) else str(c) for c in f.categories)
            )
        if f.missing_values:
            detail.append("missing codes " + ", ".join(str(v) for v in f.missing_values))
        text = f": {f.description}" if f.description else ""
        lines.append(f"- {f.name} ({'; '.join(detail)}){text}")
    lines += ["", "## Missing data"]
    lines += [f"- {k}: {n}" for k, n in doc["problems"].items()] or ["- none found"]
    lines.append("Lines marked (row rejected) removed rows; the others were imputed.")
    lines += [
        "Missing values are imputed inside the pipeline (median / most frequent).",
        "",
        "## Model",
        f"{cfg.model.estimator}, params {cfg.model.params | doc['best_params']}, "
        f"{cfg.model.calibration} calibration ({cfg.model.calibration_cv}-fold).",
        "",
        "## Performance (with 95% bootstrap CIs)",
    ]
    loso = doc.get("loso")
    if loso is None:
        lines += [
            f"- Cross-validated ({cfg.split.cv_folds}-fold): AUROC {ci(cv, 'auroc')}, "
            f"AUPRC {ci(cv, 'auprc')}, Brier {cv['brier']:.3f}",
            f"- Held-out test: AUROC {ci(te, 'auroc')}, AUPRC {ci(te, 'auprc')}, "
            f"Brier {te['brier']:.3f}",
            f"- Threshold {doc['threshold']:.3f} ({cfg.eval.threshold_policy}, chosen on CV): "
            f"test sensitivity {te['sensitivity']:.3f}, specificity {te['specificity']:.3f}, "
            f"PPV {te['ppv']:.3f}, NPV {te['npv']:.3f}",
            "",
            "## Calibration",
            f"- CV: {_calibration(cv)}",
            f"- Test: {_calibration(te)}",
            "",
            "## Subgroups (test split)",
        ]
    else:
        lines += [
            f"- Pooled out-of-{cfg.split.group} (leave-one-{cfg.split.group}-out; no random "
            f"test split): AUROC {ci(cv, 'auroc')}, AUPRC {ci(cv, 'auprc')}, "
            f"Brier {cv['brier']:.3f}",
            f"- Threshold of the shipped model {doc['threshold']:.3f} "
            f"({cfg.eval.threshold_policy}, chosen on the pooled out-of-{cfg.split.group} "
            f"predictions): sensitivity {cv['sensitivity']:.3f}, specificity "
            f"{cv['specificity']:.3f}, PPV {cv['ppv']:.3f}, NPV {cv['npv']:.3f}",
            "- The shipped model is fitted on every group.",
            "",
            *loso_lines(str(cfg.split.group), loso, cfg.eval.threshold_policy),
            "",
            "## Calibration",
            f"- Pooled out-of-{cfg.split.group}: {_calibration(cv)}",
            "",
            f"## Subgroups (pooled out-of-{cfg.split.group} predictions)",
        ]
    for name, values in doc["subgroups"].items():
        for v, r in values.items():
            flag = " (too small to judge: < 30 rows, or < 10 events or non-events)" * bool(
                r["too_small_to_judge"]
            )
            lines.append(
                f"- {name}={v}: n {r['n']}, events {r['events']}, AUROC {r['auroc']:.3f}{flag}"
            )
    lines += [
        "",
        "## Intended use",
        cfg.intended_use,
        "",
        "## Limitations",
        cfg.limitations or "Validated on one source only; re-check at each site.",
        "",
    ]
    return "\n".join(lines)


def _population_lines(s: Any, refusals: dict[str, int]) -> list[str]:
    """The intended population and the rows refused for it (never scored)."""
    if not s.population:
        return []
    span = ", ".join(f"{c} {lo:g}-{hi:g}" for c, (lo, hi) in s.population.items())
    counts = ", ".join(f"{code} {n}" for code, n in refusals.items()) or "none"
    return [f"Intended population: {span}. Refused rows by code: {counts}."]


def loso_lines(group: str, loso: dict, policy: str) -> list[str]:
    """The leave-one-group-out table and a paragraph on how much performance varies."""

    def num(v: Any, digits: int = 3) -> str:
        return f"{v:.{digits}f}" if isinstance(v, int | float) and np.isfinite(v) else "undefined"

    lines = [
        f"## Performance by {group} (leave-one-{group}-out)",
        f"Each {group} is predicted by a model fitted on the other {group} values; its threshold "
        f"({policy}) is chosen on those training {group} values and applied unchanged.",
        "",
        f"| {group} | n | prevalence | AUROC | calibration slope | calibration intercept "
        "| threshold | sensitivity | specificity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g, r in loso["groups"].items():
        lines.append(
            f"| {g} | {r['n']} | {num(r['prevalence'])} | {num(r['auroc'])} "
            f"| {num(r['calibration_slope'], 2)} | {num(r['calibration_intercept'], 2)} "
            f"| {num(r['threshold'])} | {num(r['sensitivity'])} | {num(r['specificity'])} |"
        )
    a_lo, a_hi = loso["auroc_range"]
    s_lo, s_hi = loso["calibration_slope_range"]
    i_lo, i_hi = loso["calibration_intercept_range"]
    n = len(loso["groups"])
    lines += [
        "",
        f"Across the {n} {group} values, out-of-{group} AUROC ranged from {num(a_lo)} to "
        f"{num(a_hi)} (pooled {num(loso['pooled_auroc'])}); calibration slope from "
        f"{num(s_lo, 2)} to {num(s_hi, 2)} and intercept from {num(i_lo, 2)} to {num(i_hi, 2)} "
        "(a slope of 1 and intercept of 0 would be perfect). Sensitivity ranged from "
        f"{num(loso['sensitivity_range'][0])} to {num(loso['sensitivity_range'][1])} and "
        f"specificity from {num(loso['specificity_range'][0])} to "
        f"{num(loso['specificity_range'][1])} at a threshold carried over from other sites. "
        "Discrimination that transfers does not mean calibration does: check calibration, and "
        "recalibrate, at each new site before use.",
    ]
    return lines


def _calibration(r: dict) -> str:
    """Slope, intercept and ECE in words; an undefined slope says why."""
    slope = calibration_text(r.get("calibration_slope"), r.get("calibration_note"))
    intercept = calibration_text(r.get("calibration_intercept"))
    return f"slope {slope}, intercept {intercept}, ECE {r['ece']:.3f}"
