"""Receiving one uploaded file from a multipart body, streamed to disk with a size cap.

Starlette spools uploads without any limit (PITFALLS.md), so the body is parsed here as it
arrives: the file part goes to a temp file in the blob store while its sha256 is computed, and
the upload is refused (413) as soon as it passes the cap, before the rest is read.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FIELDS = 16
BODY_OVERHEAD = 64 * 1024  # multipart headers and small fields, beyond the file itself


class UploadError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class ReceivedFile:
    path: Path
    size: int
    sha256: str
    head: bytes  # first bytes, for sniffing the format
    filename: str  # as sent by the client, cleaned; metadata only, never a path
    fields: dict[str, str] = field(default_factory=dict)


def clean_filename(raw: str) -> str:
    """The last path component, without control characters, at most 255 characters.

    It is only ever shown to people; files are stored under their content hash.
    """
    name = raw.replace("\\", "/").split("/")[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip()
    return name[:255]


async def feed_parser(
    parser: MultipartParser, body: AsyncIterator[bytes], max_total: int, too_large: str
) -> None:
    """Stream `body` into a multipart parser: 413 `upload_too_large` (with `too_large` as the
    message) once it passes `max_total` bytes, 400 `bad_multipart` when the parser chokes.
    UploadErrors raised by the parser's callbacks, and disk errors, pass through."""
    total = 0
    async for chunk in body:
        total += len(chunk)
        if total > max_total:
            raise UploadError(413, "upload_too_large", too_large)
        try:
            parser.write(chunk)
        except (UploadError, OSError):  # OSError: the disk (ENOSPC answers 507), not the body
            raise
        except Exception as exc:
            msg = f"The multipart body is malformed: {exc}"
            raise UploadError(400, "bad_multipart", msg) from exc
    parser.finalize()


async def receive_file(
    content_type: str,
    body: AsyncIterator[bytes],
    temp: Path,
    *,
    max_bytes: int,
    field_name: str = "file",
) -> ReceivedFile:
    """Parse a multipart/form-data body; write the part named `field_name` to `temp`."""
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(
            400, "not_multipart", "Send the file as multipart/form-data in a field named 'file'."
        )
    if not 1 <= len(params[b"boundary"]) <= 70:  # RFC 2046: 1 to 70 characters
        raise UploadError(
            400, "bad_multipart", "The multipart boundary must be 1 to 70 characters."
        )
    state: dict[str, Any] = {
        "headers": {},
        "field": b"",
        "value": b"",
        "name": None,
        "filename": None,
        "is_file": False,
        "found": False,
        "size": 0,
        "buf": b"",
        "fields": {},
        "head": b"",
        "ended": False,
    }
    sha = hashlib.sha256()
    fh = open(temp, "wb")  # noqa: SIM115 (closed in finally)

    def on_part_begin() -> None:
        state.update(headers={}, name=None, filename=None, is_file=False, buf=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        disp = state["headers"].get(b"content-disposition", b"")
        _, opts = parse_options_header(disp)
        state["name"] = opts.get(b"name", b"").decode("utf-8", "replace")
        fname = opts.get(b"filename")
        state["is_file"] = state["name"] == field_name
        if fname is not None and not state["is_file"]:
            raise UploadError(
                400,
                "missing_file",
                f"Send the file in a field named '{field_name}' (it came in '{state['name']}').",
            )
        if state["is_file"]:
            if state["found"]:
                raise UploadError(400, "several_files", "Send one file per request.")
            state["found"] = True
            state["filename"] = (fname or b"").decode("utf-8", "replace")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if state["is_file"]:
            state["size"] += len(chunk)
            if state["size"] > max_bytes:
                raise UploadError(
                    413,
                    "upload_too_large",
                    f"The file is larger than the limit of {max_bytes // (1024 * 1024)} MB.",
                )
            if len(state["head"]) < 132:
                state["head"] += chunk[: 132 - len(state["head"])]
            sha.update(chunk)
            fh.write(chunk)
        else:
            state["buf"] += chunk
            if len(state["buf"]) > 4096:
                raise UploadError(400, "field_too_large", "A form field is over 4 KB.")

    def on_part_end() -> None:
        if not state["is_file"] and state["name"]:
            if len(state["fields"]) >= MAX_FIELDS:
                raise UploadError(400, "too_many_fields", f"More than {MAX_FIELDS} form fields.")
            state["fields"][state["name"]] = state["buf"].decode("utf-8", "replace")

    def on_end() -> None:
        state["ended"] = True

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_end": on_end,
        },
    )
    try:  # the whole body, not just the file part, is capped
        too_large = f"The upload is larger than the limit of {max_bytes // (1024 * 1024)} MB."
        await feed_parser(parser, body, max_bytes + BODY_OVERHEAD, too_large)
    finally:
        fh.close()
    if not state["ended"]:  # no closing boundary: the body was cut short
        raise UploadError(400, "incomplete_upload", "The upload ended early; send it again.")
    if not state["found"]:
        raise UploadError(400, "missing_file", "No file was sent: use a field named 'file'.")
    return ReceivedFile(
        path=temp,
        size=state["size"],
        sha256=sha.hexdigest(),
        head=state["head"],
        filename=clean_filename(state["filename"] or ""),
        fields=state["fields"],
    )
