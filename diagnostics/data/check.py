"""`diagnostics data check`: what a dataset config yields, before any training.

Counts images and patients per split, prevalence per finding (with how many images leave it
unknown), and any patient found in two splits. Patient keys are never printed, only counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from diagnostics.data.cxr import CXRTable
from diagnostics.data.splits import patient_overlap


def summarize(table: CXRTable) -> dict[str, Any]:
    frame = table.frame
    splits = sorted(frame["split"].unique(), key=_split_order)
    per_split: dict[str, Any] = {}
    for name in [*splits, "all"]:
        part = frame if name == "all" else frame[frame["split"] == name]
        prevalence = {}
        for f in table.findings:
            values = part[f].to_numpy(dtype=np.float64)
            known = ~np.isnan(values)
            n_known = int(known.sum())
            positives = int((values[known] == 1).sum())
            prevalence[f] = {
                "positive": positives,
                "annotated": n_known,
                "nan": int((~known).sum()),
                "prevalence": positives / n_known if n_known else None,
            }
        per_split[name] = {
            "images": len(part),
            "patients": int(part["patient_id"].nunique()),
            "prevalence": prevalence,
        }
    overlap = patient_overlap(frame)
    warnings = []
    for f in table.findings:
        p = per_split["all"]["prevalence"][f]
        if p["annotated"] and p["positive"] == p["annotated"]:
            warnings.append(f"{f}: no negative among {p['annotated']:,} annotated images")
        elif p["annotated"] and p["positive"] == 0:
            warnings.append(f"{f}: no positive among {p['annotated']:,} annotated images")
    return {
        "source": table.source,
        "images_verified": table.images_verified,
        "rows_read": table.rows_read,
        "images": len(frame),
        "patients": int(frame["patient_id"].nunique()),
        "findings": list(table.findings),
        "splits": per_split,
        "patient_overlap": {pair: len(p) for pair, p in overlap.items()},
        "views": {
            ("unknown" if pd.isna(k) else str(k)): int(v)
            for k, v in frame["view"].value_counts(dropna=False).items()
        },
        "notes": list(table.notes) + warnings,
    }


def _split_order(name: str) -> tuple[int, str]:
    order = {"train": 0, "val": 1, "validate": 1, "valid": 1, "test": 2}
    return (order.get(name, 3), name)


def render(summary: dict[str, Any]) -> str:
    """The summary as plain text for a terminal."""
    lines: list[str] = []
    add = lines.append
    add(f"dataset: {summary['source']}")
    if summary["images_verified"]:
        add("images: every file present on disk (existence checked, not decoded)")
    else:
        add("images: NOT VERIFIED (counts come from the label file alone)")
    add(
        f"rows read: {summary['rows_read']:,}   images kept: {summary['images']:,}   "
        f"patients: {summary['patients']:,}"
    )
    views = ", ".join(f"{k}={v:,}" for k, v in summary["views"].items())
    add(f"views: {views}")
    add("")
    names = [s for s in summary["splits"] if s != "all"] + ["all"]
    add(f"{'split':<8}{'images':>10}{'patients':>10}")
    for s in names:
        d = summary["splits"][s]
        add(f"{s:<8}{d['images']:>10,}{d['patients']:>10,}")
    add("")
    add("prevalence = positive / annotated; NaN = images where the finding is not annotated")
    header = f"{'finding':<28}" + "".join(f"{s:>18}" for s in names) + f"{'NaN (all)':>12}"
    add(header)
    for f in summary["findings"]:
        cells = []
        for s in names:
            p = summary["splits"][s]["prevalence"][f]
            cells.append(
                f"{'-':>18}"
                if p["prevalence"] is None
                else f"{p['positive']:>8,} {100 * p['prevalence']:>7.2f}%"
            )
        nan = summary["splits"]["all"]["prevalence"][f]["nan"]
        add(f"{f:<28}" + "".join(f"{c:>18}" for c in cells) + f"{nan:>12,}")
    add("")
    if summary["patient_overlap"]:
        for pair, n in summary["patient_overlap"].items():
            add(f"PATIENT OVERLAP: {n} patients in both {pair.replace('|', ' and ')}")
    else:
        add("patient overlap between splits: none")
    for note in summary["notes"]:
        add(f"note: {note}")
    return "\n".join(lines)
