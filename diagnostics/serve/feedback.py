"""Reviewed labels back to training: a generic CSV manifest that `diagnostics train cxr`
reads (`source: manifest`).

Per study: the image blob's path, one column per finding, a pseudonymous patient key and the
site. Label rules, on each finding's latest review:
- agree: the AI's call (positive 1, negative 0); disagree: the call flipped; uncertain: empty
  (NaN, unknown, masked out of the loss);
- a corrected label L on an agree/disagree review: L = 1 (the reviewed finding follows its
  verdict, unless it is L); a correction on an uncertain review is not used;
- a "finding not listed" entry L: L = 1.
Findings nobody reviewed stay empty. Studies refused by QC are never exported. A study scored
with a flag (outside the model's population) has no AI call: agree and disagree say nothing
there, so only corrections and added findings give labels.

The patient key is an HMAC-SHA256 of site + DICOM PatientID (of the study ID when there is none)
under a secret kept in the service's data folder: stable across exports, not reversible.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diagnostics.serve.store import Store


def pseudonym_secret(data_dir: Path) -> bytes:
    """The HMAC secret, created once (0600) under the service's data folder."""
    path = data_dir / "pseudonym.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def _patient_id(data: bytes) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:
        return None
    value = str(ds.get("PatientID", "") or "").strip()
    return value or None


def patient_key(secret: bytes, view: Mapping[str, Any], blob: bytes) -> str:
    pid = _patient_id(blob) if view["format"] == "dicom" else None
    # one site's patient 123 is not another's: the site is part of the identity
    ident = f"{view['clinic']}:{pid}" if pid else f"study:{view['id']}"
    return hmac.new(secret, ident.encode("utf-8"), hashlib.sha256).hexdigest()[:20]


def reviewed_labels(view: Mapping[str, Any]) -> dict[str, float | None]:
    """finding -> 1.0 / 0.0 / None (unknown), from the latest review of each finding."""
    labels: dict[str, float | None] = {f["label"]: None for f in view["findings"]}
    corrected: set[str] = set()
    for f in view["findings"]:
        review = f["review"]
        if review is None:
            continue
        verdict = review["verdict"]
        if f["positive"] is not None:  # no call (outside the population): nothing to agree with
            call = 1.0 if f["positive"] else 0.0
            labels[f["label"]] = (
                call if verdict == "agree" else 1.0 - call if verdict == "disagree" else None
            )
        if review["corrected_label"] and verdict != "uncertain":
            corrected.add(review["corrected_label"])
    for r in view.get("unlisted", []):
        corrected.add(r["corrected_label"])
    for label in corrected:
        labels[label] = 1.0
    return labels


def export_manifest(
    store: Store, out: Path, data_dir: Path, *, since: Any = None, clinic: str | None = None
) -> int:
    """Write the manifest; returns the number of studies written.

    One row per image the model scored (a study's frontal images), each with its study's
    reviewed labels: a finding the clinician confirmed on the study is in each of its views.
    Images refused per image (laterals) or late are left out: the model never read them."""
    views = store.reviewed_studies(since=since, clinic=clinic)
    secret = pseudonym_secret(data_dir)
    rows = []
    columns: list[str] = []
    for view in views:
        labels = reviewed_labels(view)
        for label in labels:
            if label not in columns:
                columns.append(label)
        scored = [i["id"] for i in view.get("images", []) if i["status"] == "scored"]
        shas = [
            inst.content_sha256
            for inst in (store.get_instance(i) for i in scored)
            if inst is not None
        ] or [view["sha256"]]  # a study stored before its images were recorded
        key = patient_key(secret, view, store.blobs.path(shas[0]).read_bytes())
        for sha, instance in zip(shas, scored or [""], strict=False):
            rows.append(
                {
                    "path": str(store.blobs.path(sha).resolve()),
                    "patient_key": key,
                    "site": view["clinic"],
                    "study_id": view["id"],
                    "instance_id": instance,
                    **{k: ("" if v is None else int(v)) for k, v in labels.items()},
                }
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=["path", "patient_key", "site", "study_id", "instance_id", *columns]
        )
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in writer.fieldnames})
    return len(views)
