"""Writing batch scoring results: one record per input, as JSON lines or CSV. Torch-free."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO


class FindingsWriter:
    """`.jsonl`: each record whole. `.csv`: one row per input, one probability column per label."""

    def __init__(self, path: Path, labels: list[str]) -> None:
        self.path = path
        self.labels = labels
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: TextIO = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv: csv.DictWriter | None = None
        if path.suffix.lower() == ".csv":
            cols = ["input", "status", "code", "flags", "message"]
            for label in labels:
                cols += [f"{label}_probability", f"{label}_positive", f"{label}_heatmap"]
            cols += ["threshold_" + label for label in labels] + [
                "ood_score",
                "qc_failed",
                "model_sha256",
                "model_version",
                "preprocess_version",
                "provider",
                "total_ms",
            ]
            self._csv = csv.DictWriter(self._fh, fieldnames=cols)
            self._csv.writeheader()

    def write(self, input_path: str, record: dict[str, Any]) -> None:
        if self._csv is None:
            # NaN never reaches a file: the runner refuses non-finite outputs before this point.
            self._fh.write(json.dumps({"input": input_path, **record}, allow_nan=False) + "\n")
        else:
            row: dict[str, Any] = {
                "input": input_path,
                "status": record.get("status"),
                "code": record.get("code") or "",
                "flags": ";".join(record.get("flags") or []),
                "message": record.get("message") or "",
                "ood_score": record.get("ood_score"),
                "qc_failed": ";".join(
                    q["code"] for q in record.get("qc", []) if not q.get("passed")
                ),
                "model_sha256": record.get("model_sha256", ""),
                "model_version": record.get("model_version") or "",
                "preprocess_version": record.get("preprocess_version") or "",
                "provider": record.get("provider", ""),
                "total_ms": (record.get("timing_ms") or {}).get("total"),
            }
            for f in record.get("findings", []):
                row[f"{f['label']}_probability"] = f["probability"]
                # empty where no call was made (flagged: outside the model's population)
                row[f"{f['label']}_positive"] = "" if f["positive"] is None else int(f["positive"])
                row[f"{f['label']}_heatmap"] = f.get("heatmap") or ""
                row[f"threshold_{f['label']}"] = f["threshold"]
            self._csv.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> FindingsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
