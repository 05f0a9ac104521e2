"""Structured logs for the service: one JSON object per line.

What goes in is decided by the callers: generated IDs (study, key, worker), codes, timings.
Never patient names, hospital identifiers, DICOM UIDs, file contents or API keys.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

# Five or more dot-separated numbers: a DICOM UID (an IPv4 address has four). A library message
# may quote one ("Invalid value for VR UI: '1.2.840...'"); the log never shows it.
_UID = re.compile(r"\b\d+(?:\.\d+){4,}\b")


def redact(text: str) -> str:
    return _UID.sub("<uid>", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info and record.exc_info[0] is not None:
            doc["error"] = record.exc_info[0].__name__  # the type only: no values, no contents
        return json.dumps(doc, ensure_ascii=False)


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the app logs requests itself
    # Library warnings (pydicom's, Pillow's) become JSON log lines like the rest, not raw
    # stderr text, and pass through the same redaction.
    logging.captureWarnings(True)
    # pydicom's messages quote tag values (a character set field can hold anything a device
    # wrote, names included): keep the level, drop the text.
    logging.getLogger("pydicom").addFilter(_without_text)
    logging.getLogger("py.warnings").addFilter(_pydicom_warning_without_text)


_PYDICOM_TEXT = "pydicom: a file had a problem (text not logged: it may quote tag values)"


def _without_text(record: logging.LogRecord) -> bool:
    record.msg, record.args = _PYDICOM_TEXT, None
    return True


def _pydicom_warning_without_text(record: logging.LogRecord) -> bool:
    if "pydicom" in str(record.msg):  # a captured warning's text names the file that warned
        record.msg, record.args = _PYDICOM_TEXT, None
    return True
