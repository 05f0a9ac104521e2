"""Receiving DICOM instances from a `multipart/related; type="application/dicom"` body (DICOMweb
STOW-RS, PS3.18), each part streamed to its own temp file with a size cap.

As in `upload.py`, nothing is spooled without limit: each part goes to a temp file in the blob
store while its sha256 is computed, and the request is refused (413) as soon as a part or the
whole body passes its cap. A part that is not `application/dicom` is refused on its own (the
others may still be stored); a body that is not multipart/related of DICOM is refused whole.
If the request fails, every temp file it wrote is removed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from python_multipart.multipart import MultipartParser, parse_options_header

from diagnostics.serve.upload import ReceivedFile, UploadError, feed_parser

DICOM = b"application/dicom"
HEAD_BYTES = 132  # the Part 10 preamble and "DICM", for sniffing the format
# Content-Transfer-Encoding values that leave the bytes as they are (HTTP sends binary).
IDENTITY_ENCODINGS = (b"", b"binary", b"8bit", b"7bit")


@dataclass
class RelatedPart:
    """One part of the body: the file received, or why this part alone was refused."""

    file: ReceivedFile | None
    refusal: UploadError | None = None


def related_boundary(content_type: str) -> bytes:
    """The boundary of a STOW-RS request's Content-Type. Raises UploadError: 415 for another
    media type (or another `type` parameter), 400 for a missing or invalid boundary.

    The `type` parameter may be quoted or not; when it is absent, each part's own Content-Type
    decides."""
    ctype, raw = parse_options_header(content_type or "")
    params = {k.lower(): v for k, v in raw.items()}  # parameter names are case-insensitive
    if ctype != b"multipart/related":
        raise UploadError(
            415,
            "unsupported_media_type",
            'Send instances as multipart/related; type="application/dicom" (DICOMweb STOW-RS).',
        )
    kind = params.get(b"type", DICOM).strip().lower()
    if kind != DICOM:
        raise UploadError(
            415,
            "unsupported_media_type",
            f'Only DICOM Part 10 instances (type="application/dicom") are accepted, not '
            f"{_printable(kind)}; metadata with bulk data (application/dicom+json or "
            "application/dicom+xml) is not supported.",
        )
    boundary = params.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 70:  # RFC 2046: 1 to 70 characters
        raise UploadError(
            400, "bad_multipart", "The multipart boundary is missing or not 1 to 70 characters."
        )
    return boundary


class _Part:
    """The part being received."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.field = self.value = b""
        self.path: Path | None = None
        self.fh: IO[bytes] | None = None
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.refusal: UploadError | None = None


async def receive_parts(
    content_type: str,
    body: AsyncIterator[bytes],
    make_temp: Callable[[], Path],
    *,
    max_part_bytes: int,
    max_total_bytes: int,
    max_parts: int = 256,
) -> list[RelatedPart]:
    """Parse a multipart/related body of DICOM instances; write each part to `make_temp()`.

    Raises UploadError for the whole request: 415 (media type), 413 (a part over
    `max_part_bytes`, the body over `max_total_bytes`, more than `max_parts` parts), 400
    (malformed, cut short before its closing boundary, no parts). OSError (the disk) passes
    through. On any error every temp file written is removed; on success the caller owns them.
    """
    boundary = related_boundary(content_type)
    done: list[RelatedPart] = []
    temps: list[Path] = []
    cur = _Part()
    ended = False

    def on_part_begin() -> None:
        nonlocal cur
        if len(done) >= max_parts:
            raise UploadError(413, "too_many_parts", f"More than {max_parts} instances at once.")
        cur = _Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        cur.field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        cur.value += data[start:end]

    def on_header_end() -> None:
        cur.headers[cur.field.strip().lower()] = cur.value.strip()
        cur.field = cur.value = b""

    def on_headers_finished() -> None:
        ptype, _ = parse_options_header(cur.headers.get(b"content-type", b"").decode("latin-1"))
        encoding = cur.headers.get(b"content-transfer-encoding", b"").lower()
        if ptype != DICOM:
            shown = _printable(ptype) if ptype else "without a Content-Type"
            cur.refusal = UploadError(
                415, "part_not_dicom", f"A part is {shown}; each part must be application/dicom."
            )
        elif encoding not in IDENTITY_ENCODINGS:
            cur.refusal = UploadError(
                415,
                "part_encoding",
                f"A part is sent as {_printable(encoding)}; send the DICOM bytes as they are.",
            )
        else:
            cur.path = make_temp()
            temps.append(cur.path)
            cur.fh = open(cur.path, "wb")  # noqa: SIM115 (closed at the part's end, or on error)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if cur.fh is None:  # a refused part: its bytes are read and dropped
            return
        chunk = data[start:end]
        cur.size += len(chunk)
        if cur.size > max_part_bytes:
            raise UploadError(
                413,
                "upload_too_large",
                f"An instance is larger than the limit of {_mb(max_part_bytes)}.",
            )
        if len(cur.head) < HEAD_BYTES:
            cur.head += chunk[: HEAD_BYTES - len(cur.head)]
        cur.sha.update(chunk)
        cur.fh.write(chunk)

    def on_part_end() -> None:
        if cur.fh is None or cur.path is None:
            done.append(RelatedPart(None, cur.refusal))
            return
        cur.fh.close()
        cur.fh = None
        got = ReceivedFile(cur.path, cur.size, cur.sha.hexdigest(), cur.head, filename="")
        done.append(RelatedPart(got))

    def on_end() -> None:
        nonlocal ended
        ended = True

    parser = MultipartParser(
        boundary,
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
    too_large = (
        f"The request is larger than the limit of {_mb(max_total_bytes)}; send the "
        "instances in several requests."
    )
    try:
        await feed_parser(parser, body, max_total_bytes, too_large)
        if not ended:  # no closing boundary: the body was cut short
            raise UploadError(
                400,
                "incomplete_upload",
                "The body ended before its closing boundary; send it again.",
            )
        if not done:
            raise UploadError(400, "no_instances", "The request holds no instances.")
    except BaseException:  # a refusal, the disk, a disconnect, a timeout, a cancellation
        if cur.fh is not None:
            cur.fh.close()
        for path in temps:
            path.unlink(missing_ok=True)
        raise
    return done


def _printable(value: bytes) -> str:
    """A client's media type, safe to echo: printable ASCII, at most 60 characters."""
    return re.sub(r"[^\x20-\x7e]", "?", value.decode("latin-1"))[:60]


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.3g} MB"
