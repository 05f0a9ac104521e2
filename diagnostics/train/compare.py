"""`diagnostics models compare`: two models on the same images, per finding.

- Discrimination: AUROC of each, their difference with a paired bootstrap 95% CI (the same
  resampled patients' images for both models) and DeLong's test (DeLong et al. 1988, the fast
  midrank form of Sun & Xu 2014).
- Calibration: slope (logistic regression of the label on logit(p); 1 is ideal; undefined, with
  the reason, where the score separates the classes perfectly) and ECE.
- The operating point: sensitivity and specificity of each model at its own threshold.
- Disagreements: images whose positive/negative call differs, by a study key (the manifest's
  study_id, or a hash of the file name), never a patient identifier.
- Subgroups: the same AUROC figures per value of each subgroup column asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from diagnostics.train.metrics import at_threshold, auroc, calibration_fields, calibration_text, ece


def _midrank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    ranks = np.zeros(n)
    i = 0
    while i < n:
        j = i
        while j < n and xs[j] == xs[i]:
            j += 1
        ranks[i:j] = 0.5 * (i + j - 1) + 1  # 1-based mean rank of the tie
        i = j
    out = np.empty(n)
    out[order] = ranks
    return out


def delong(y: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> dict[str, float]:
    """AUROCs of two scores on the same cases, and DeLong's two-sided p-value for equality."""
    y = np.asarray(y, dtype=float)
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    if m < 2 or n < 2:
        return {"auc1": math.nan, "auc2": math.nan, "z": math.nan, "p_value": math.nan}
    v10, v01, aucs = [], [], []
    for p in (np.asarray(p1, float), np.asarray(p2, float)):
        x, yy = p[pos], p[neg]
        tx, ty, tz = _midrank(x), _midrank(yy), _midrank(np.concatenate([x, yy]))
        auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10.append((tz[:m] - tx) / n)  # structural components, positives
        v01.append(1.0 - (tz[m:] - ty) / m)  # and negatives
        aucs.append(auc)
    s10, s01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    s = s10 / m + s01 / n
    var = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    if var <= 0:
        return {"auc1": aucs[0], "auc2": aucs[1], "z": 0.0, "p_value": 1.0}
    z = (aucs[0] - aucs[1]) / math.sqrt(var)
    return {"auc1": aucs[0], "auc2": aucs[1], "z": z, "p_value": float(2 * stats.norm.sf(abs(z)))}


def paired_bootstrap(
    y: np.ndarray,
    p1: np.ndarray,
    p2: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    n: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """95% CI of AUROC(p1) - AUROC(p2), resampling patients (`groups`) or images, paired."""
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    keys = np.asarray(groups) if groups is not None else np.arange(len(y))
    uniq, inv = np.unique(keys, return_inverse=True)
    members = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    diffs = []
    for _ in range(n):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[k] for k in pick])
        a, b = auroc(y[idx], p1[idx]), auroc(y[idx], p2[idx])
        if np.isfinite(a) and np.isfinite(b):
            diffs.append(a - b)
    if not diffs:
        return (math.nan, math.nan)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return (float(lo), float(hi))


def study_key(path: str, study_id: str | None = None) -> str:
    """A key to find an image again, without patient identity."""
    if study_id:
        return str(study_id)
    return hashlib.sha256(Path(path).name.encode()).hexdigest()[:12]


def compare_finding(
    y: np.ndarray,
    p_cand: np.ndarray,
    p_base: np.ndarray,
    t_cand: float,
    t_base: float,
    groups: np.ndarray | None,
    n_boot: int,
) -> dict[str, Any]:
    known = ~np.isnan(y)
    y, pc, pb = y[known], p_cand[known], p_base[known]
    g = groups[known] if groups is not None else None
    dl = delong(y, pc, pb)
    lo, hi = paired_bootstrap(y, pc, pb, g, n=n_boot)
    return {
        "n": len(y),
        "positives": int(y.sum()),
        "candidate": {
            "auroc": auroc(y, pc),
            **calibration_fields(y, pc),  # slope NaN with calibration_note where undefined
            "ece": ece(y, pc),
            "threshold": t_cand,
            **{k: at_threshold(y, pc, t_cand)[k] for k in ("sensitivity", "specificity")},
        },
        "baseline": {
            "auroc": auroc(y, pb),
            **calibration_fields(y, pb),  # slope NaN with calibration_note where undefined
            "ece": ece(y, pb),
            "threshold": t_base,
            **{k: at_threshold(y, pb, t_base)[k] for k in ("sensitivity", "specificity")},
        },
        "auroc_diff": auroc(y, pc) - auroc(y, pb),
        "auroc_diff_ci": [lo, hi],
        "delong_p": dl["p_value"],
    }


def _withheld_lines(dataset: dict[str, Any]) -> list[str]:
    """What the clinic's QC kept out of the comparison, per model, by reason."""
    if not dataset.get("population_check", False):
        return [
            "",
            "Population check OFF: every image is compared, including any the clinic "
            "would withhold.",
        ]
    parts = [
        f"{who}: " + (", ".join(f"{k} {v}" for k, v in reasons.items()) or "none")
        for who, reasons in dataset.get("withheld", {}).items()
    ]
    return [
        "",
        "Compared on images both models would score with a call; withheld by the "
        "clinic's QC, " + "; ".join(parts) + ".",
    ]


def _dataset_line(dataset: dict[str, Any], models: list[tuple[str, str]]) -> str:
    """'Dataset: NAME, split S, N images. A sha256 `..`, B sha256 `..`.' for a report's
    header; `models`: (who, sha256) pairs."""
    shas = ", ".join(f"{who} sha256 `{sha[:12]}`" for who, sha in models)
    return (
        f"Dataset: {dataset['name']}, split {dataset['split']}, {dataset['images']} images. {shas}."
    )


def render_markdown(report: dict[str, Any]) -> str:
    c, b = report["candidate"], report["baseline"]
    lines = [
        f"# Compare: {c['label']} vs {b['label']}",
        "",
        _dataset_line(report["dataset"], [("Candidate", c["sha256"]), ("baseline", b["sha256"])]),
        *_withheld_lines(report["dataset"]),
        "",
        "| finding | n (pos) | AUROC cand | AUROC base | diff [95% CI] | DeLong p | "
        "slope cand/base | ECE cand/base | sens cand/base | spec cand/base | disagree |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f, r in report["findings"].items():
        rc, rb = r["candidate"], r["baseline"]
        lo, hi = r["auroc_diff_ci"]
        lines.append(
            f"| {f} | {r['n']} ({r['positives']}) | {rc['auroc']:.4f} | {rb['auroc']:.4f} | "
            f"{r['auroc_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {r['delong_p']:.3g} | "
            f"{_slope(rc)}/{_slope(rb)} | "
            f"{rc['ece']:.3f}/{rb['ece']:.3f} | "
            f"{rc['sensitivity']:.3f}/{rb['sensitivity']:.3f} | "
            f"{rc['specificity']:.3f}/{rb['specificity']:.3f} | {len(r['disagreements'])} |"
        )
    undefined = [
        f"- {f}, {who}: calibration slope undefined: {r[who]['calibration_note']}."
        for f, r in report["findings"].items()
        for who in ("candidate", "baseline")
        if r[who].get("calibration_note")
    ]
    if undefined:
        lines += ["", *undefined]
    for col, groups in report.get("subgroups", {}).items():
        lines += [
            "",
            f"## By {col}",
            "",
            "| value | finding | n | AUROC cand | AUROC base |",
            "|---|---|---|---|---|",
        ]
        for value, per in groups.items():
            for f, r in per.items():
                lines.append(
                    f"| {value} | {f} | {r['n']} | {r['candidate_auroc']:.4f} | "
                    f"{r['baseline_auroc']:.4f} |"
                )
    lines += ["", "Disagreements (study keys, first 20 per finding):"]
    for f, r in report["findings"].items():
        lines.append(f"- {f}: {', '.join(r['disagreements'][:20]) or 'none'}")
    return "\n".join(lines) + "\n"


def _slope(r: dict[str, Any]) -> str:
    """The calibration slope in the table: "undefined" where it does not exist (the reason is
    listed under the table). JSON turns NaN into null, so None means undefined too."""
    return calibration_text(r.get("calibration_slope"))


def json_dump(report: dict[str, Any], path: Path) -> None:
    from diagnostics.train.evaluate import json_safe

    path.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))


# --------------------------------------------------------------------------- fp32 vs int8


def compare_precisions(
    fp32_path: Path,
    int8_path: Path,
    data_cfg: Any,
    *,
    split: str = "val",
    out_dir: Path,
    label: str = "",
    timing_images: int = 16,
) -> dict[str, Any]:
    """The fp32 file and its int8 variant on the same images (`models compare --int8`): per
    finding AUROC of each and their difference, the largest probability difference and the
    agreement of the calls (each at the model's threshold); ms per image at batch 1 for each
    (median over `timing_images` images, ONNX Runtime on this machine). Written to
    out_dir/compare.json and compare.md."""
    import time
    from datetime import UTC, datetime

    from diagnostics.contract import is_positive
    from diagnostics.data.cxr import load_dataset
    from diagnostics.imaging import load_for_model
    from diagnostics.serve.runner import OnnxModel

    models = {"fp32": OnnxModel(fp32_path), "int8": OnnxModel(int8_path)}
    meta = models["fp32"].metadata
    if models["int8"].metadata.labels != meta.labels or models["int8"].precision != "int8":
        raise ValueError(f"{int8_path.name} is not the int8 variant of {fp32_path.name}")
    table = load_dataset(data_cfg)
    frame = table.frame if split == "all" else table.frame[table.frame["split"] == split]
    if frame.empty:
        raise ValueError(f"split {split!r} is empty")
    spec = meta.preprocessing
    x = np.stack([load_for_model(p, spec) for p in frame["path"]]).astype(np.float32)
    probs = {
        k: np.concatenate([m.predict(x[i : i + 16]).probabilities for i in range(0, len(x), 16)])
        for k, m in models.items()
    }
    ms: dict[str, float] = {}
    sample = x[: max(1, min(timing_images, len(x)))]
    for k, m in models.items():
        m.predict(sample[:1])  # warm-up
        times = []
        for i in range(len(sample)):
            t0 = time.perf_counter()
            m.predict(sample[i : i + 1])
            times.append((time.perf_counter() - t0) * 1000.0)
        ms[k] = float(np.median(times))
    a, b = probs["fp32"], probs["int8"]
    findings: dict[str, Any] = {}
    for i, f in enumerate(meta.labels):
        thr = meta.thresholds[f].value
        agree = is_positive(a[:, i], thr) == is_positive(b[:, i], thr)
        row: dict[str, Any] = {
            "max_prob_diff": float(np.abs(a[:, i] - b[:, i]).max()),
            "call_agreement": float(agree.mean()),
            "calls_differ": int((~agree).sum()),
        }
        if f in frame:
            y = frame[f].to_numpy(dtype=float)
            known = ~np.isnan(y)
            row["n"] = int(known.sum())
            row["auroc_fp32"] = auroc(y[known], a[known, i])
            row["auroc_int8"] = auroc(y[known], b[known, i])
            row["auroc_diff"] = row["auroc_int8"] - row["auroc_fp32"]
        findings[f] = row
    gate = models["int8"].metadata.int8_gate
    report: dict[str, Any] = {
        "model": label or str(fp32_path),
        "fp32": {"path": str(fp32_path), "sha256": models["fp32"].sha256},
        "int8": {"path": str(int8_path), "sha256": models["int8"].sha256},
        "gate": gate.model_dump() if gate is not None else None,
        "dataset": {"name": table.source, "split": split, "images": len(frame)},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "max_prob_diff": float(np.abs(a - b).max()),
        "call_agreement": float(np.mean([r["call_agreement"] for r in findings.values()])),
        "ms_per_image": ms,  # batch 1, median
        "findings": findings,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    json_dump(report, out_dir / "compare.json")
    (out_dir / "compare.md").write_text(render_precisions(report))
    return report


def render_precisions(report: dict[str, Any]) -> str:
    ms, gate = report["ms_per_image"], report["gate"]
    lines = [
        f"# fp32 vs int8: {report['model']}",
        "",
        _dataset_line(
            report["dataset"],
            [("fp32", report["fp32"]["sha256"]), ("int8", report["int8"]["sha256"])],
        ),
        f"Training-time gate: {gate['reason'] if gate else 'none recorded'}.",
        "",
        f"Batch-1 latency (median, this machine): fp32 {ms['fp32']:.2f} ms, int8 "
        f"{ms['int8']:.2f} ms ({ms['fp32'] / max(ms['int8'], 1e-9):.2f}x). "
        f"Largest probability difference {report['max_prob_diff']:.4f}.",
        "",
        "| finding | n | AUROC fp32 | AUROC int8 | diff | max prob diff | calls agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for f, r in report["findings"].items():
        if "auroc_fp32" in r:
            auc = f"{r['auroc_fp32']:.4f} | {r['auroc_int8']:.4f} | {r['auroc_diff']:+.4f}"
        else:
            auc = "— | — | —"
        lines.append(
            f"| {f} | {r.get('n', '—')} | {auc} | {r['max_prob_diff']:.4f} | "
            f"{100 * r['call_agreement']:.1f}% ({r['calls_differ']} differ) |"
        )
    return "\n".join(lines) + "\n"
