"""Decoding and preprocessing of chest radiographs. Torch-free: the clinic side runs this too.

Every input (DICOM CR/DX, PNG, JPEG) decodes to the same thing: a `DecodedImage` whose `pixels`
are a float32 array (H, W) in [0, 1] where 0 is dark (air) and 1 is bright (bone), as a radiologist
sees a MONOCHROME2 image after windowing. `preprocess` then turns that into model input, driven by
a `PreprocessSpec` that travels in the model metadata. There is one preprocessing, used by
training, evaluation, ONNX export parity and serving alike.

Refusals raise `ImageError` subclasses, each with a stable `code` and a message a clinic IT person
can act on.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import re
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from diagnostics.contract import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

_WARNINGS_LOCK = threading.Lock()
_ALPHA_LOCK = threading.Lock()

# 50 Mpx: a 7000 x 7000 detector. Larger inputs are refused before their pixels are decoded.
DEFAULT_MAX_PIXELS = 50_000_000

SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")

# Only these tags leave the decoder; patient identity never does.
SAFE_DICOM_TAGS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PatientOrientation",
    "SOPClassUID",
    "PhotometricInterpretation",
    "BitsStored",
    "BitsAllocated",
    "PixelRepresentation",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImagerPixelSpacing",
)


class ImageError(ValueError):
    """An input that cannot be decoded. `code` is stable; the message says why in plain words."""

    code = "image_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnsupportedFormatError(ImageError):
    code = "unsupported_format"


class EmptyFileError(UnsupportedFormatError):
    code = "empty_file"


class NoPixelDataError(ImageError):
    code = "no_pixel_data"


class MultiFrameError(ImageError):
    code = "multi_frame"


class UnsupportedPhotometricError(ImageError):
    code = "unsupported_photometric"


class UnsupportedTransferSyntaxError(ImageError):
    code = "unsupported_transfer_syntax"


class TruncatedFileError(ImageError):
    code = "truncated_file"


class ImageTooLargeError(ImageError):
    code = "image_too_large"


class CorruptImageError(ImageError):
    code = "corrupt_image"


class InvalidUIDError(ImageError):
    code = "invalid_uid"


class TransparentImageError(ImageError):
    code = "transparent_image"


@dataclass(frozen=True)
class Geometry:
    """Where the pixels of a reduced decode lie in the full-resolution image.

    In continuous coordinates (0 at the first pixel's outer edge, 1 at its far edge), the point
    `r` of the reduced pixels is the point `scale * r + offset` of the full image, per axis (y, x).
    A box reduction by f: scale f, offset 0. A JPEG 2000 resolution level 2^-k (its low-pass
    samples sit on the even source samples): scale 2^k, offset -(2^k - 1) / 2.
    """

    source_shape: tuple[int, int]  # (rows, cols) of the full-resolution image
    scale: tuple[float, float]  # (y, x): source pixels per reduced pixel
    offset: tuple[float, float] = (0.0, 0.0)  # (y, x), in source pixels


@dataclass
class DecodedImage:
    """A decoded grey image. `pixels`: (H, W) float32 in [0, 1], 0 = air (dark).

    With `decode(..., target=N)`, `pixels` may be a reduced-resolution version (about 2N on its
    shorter side) and `geometry` says how it maps onto the full image; `shape` is always the
    full-resolution size of the image, as its header states it.
    """

    pixels: np.ndarray
    format: str  # "dicom" | "png" | "jpeg"
    bits_stored: int
    photometric: str  # of the source; MONOCHROME1 has already been inverted in `pixels`
    dicom: dict[str, Any] = field(default_factory=dict)  # SAFE_DICOM_TAGS present in the file
    chroma: float = 0.0  # colour spread of the source, 0 for grey (see `_chroma`)
    age_years: float | None = None  # DICOM only: see `patient_age`; None = unknown
    age_source: str | None = None  # "PatientAge" | "StudyDate-PatientBirthDate"
    geometry: Geometry | None = None  # None: `pixels` is the full-resolution image

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the full-resolution image, whether `pixels` is reduced or not."""
        if self.geometry is not None:
            return self.geometry.source_shape
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


Source = str | os.PathLike[str] | bytes | IO[bytes]


def _read_bytes(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, (str, os.PathLike)):
        return Path(source).read_bytes()
    return source.read()


def sniff_format(head: bytes) -> str | None:
    """Name the container from its first bytes: 'dicom', 'png', 'jpeg' or None."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return None


def decode(
    source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS, target: int | None = None
) -> DecodedImage:
    """Decode a DICOM Part 10 file, PNG or JPEG, chosen by content, not by file name.

    `target`: the side of the model's input (its `PreprocessSpec.size`). When given, the image is
    decoded or downscaled only as far as the model needs, keeping its shorter side at least
    `REDUCE_MARGIN * target` (see `reduction_factor`): JPEG 2000 at a reduced resolution level,
    JPEG with DCT scaling, everything else decoded exactly and then box-averaged. The result
    carries a `geometry`; pass it to `resize_square`/`preprocess`. None: full resolution.
    """
    data = _read_bytes(source)
    kind = sniff_format(data[:132])
    if kind == "dicom":
        return decode_dicom(data, max_pixels=max_pixels, target=target)
    if kind in ("png", "jpeg"):
        return decode_bitmap(data, max_pixels=max_pixels, target=target)
    if not data:
        raise EmptyFileError("The file is empty (0 bytes).")
    raise UnsupportedFormatError(
        "The file is not a DICOM Part 10 file (no 'DICM' marker), a PNG or a JPEG."
    )


@dataclass
class HeaderInfo:
    """What an upload is, read from its header without decoding pixels."""

    format: str  # "dicom" | "png" | "jpeg"
    rows: int
    cols: int
    dicom: dict[str, Any] = field(default_factory=dict)  # SAFE_DICOM_TAGS
    sop_instance_uid: str | None = None  # DICOM only; an instance identifier, never logged
    age_years: float | None = None  # DICOM only: see `patient_age`
    age_source: str | None = None
    # DICOM only, never logged: what groups images into a study, and what the image is
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_class_uid: str | None = None


def inspect_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> HeaderInfo:
    """The checks `decode` makes before decoding pixels, on bytes: raises `ImageError`."""
    kind = sniff_format(data[:132])
    if kind == "dicom":
        ds = read_dicom_header(data, max_pixels=max_pixels)
        uid = instance_uid(ds)
        age, source = patient_age(ds)
        rows, cols = _int_tag(ds, "Rows"), _int_tag(ds, "Columns")
        return HeaderInfo(
            "dicom",
            rows,
            cols,
            _safe_tags(ds),
            uid,
            age,
            source,
            study_instance_uid=instance_uid(ds, "StudyInstanceUID"),
            series_instance_uid=instance_uid(ds, "SeriesInstanceUID"),
            sop_class_uid=instance_uid(ds, "SOPClassUID"),
        )
    if kind in ("png", "jpeg"):
        img = _open_bitmap(data, max_pixels)
        if _has_alpha(img):  # only these are decoded at intake, to read their alpha; one at a
            with _ALPHA_LOCK:  # time, so that concurrent uploads cannot stack their memory
                _load_bitmap(img)
                _check_opaque(img)
        return HeaderInfo(kind, img.size[1], img.size[0])
    if not data:
        raise EmptyFileError("The file is empty (0 bytes).")
    raise UnsupportedFormatError(
        "The file is not a DICOM Part 10 file (no 'DICM' marker), a PNG or a JPEG."
    )


# --------------------------------------------------------------------------- DICOM


def read_dicom_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """Parse a DICOM file and run every check that needs no pixel decoding; return the dataset.

    Refuses: not DICOM, cut short, no pixel data, multi-frame, non-monochrome, missing size tags,
    over the pixel cap, a transfer syntax with no installed decoder, uncompressed pixel data
    shorter than its header says. Cheap enough to run while a clinic waits for its upload.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # Never force=True: it turns any file into a "dataset" (PITFALLS.md). pydicom reads a file
        # cut short without an error (a partial dataset) and only warns when an encapsulated
        # pixel data sequence ends early, so record its warnings and check the last element.
        with quiet_pydicom() as caught:
            ds = pydicom.dcmread(io.BytesIO(data))
            short = _ends_early(ds, caught)  # on the raw elements, before any conversion
            _convert_all(ds)  # every value parsed now, while pydicom is kept quiet
            _convert_all(getattr(ds, "file_meta", None))
    except InvalidDicomError as exc:
        raise UnsupportedFormatError(f"Not a readable DICOM file: {_no_values(exc)}") from exc
    except (EOFError, struct.error) as exc:
        raise TruncatedFileError("The DICOM file ends early: it was cut short.") from exc
    except Exception as exc:  # pydicom raises a variety of errors for mangled headers
        if "no tag to read" in str(exc).lower():  # EOF inside a sequence
            raise TruncatedFileError("The DICOM file ends early: it was cut short.") from exc
        raise CorruptImageError(
            f"The DICOM header could not be read ({type(exc).__name__})."
        ) from exc

    if short:
        raise TruncatedFileError("The DICOM file ends early: it was cut short.")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise NoPixelDataError("The DICOM file holds float pixel data, not a radiograph.")
        raise NoPixelDataError(
            "The DICOM file has no pixel data (no image): it holds none, or it was cut short "
            "before the image."
        )

    frames = _int_tag(ds, "NumberOfFrames", default=1)
    if frames < 1:
        raise CorruptImageError(f"The DICOM tag NumberOfFrames is {frames}; at least 1 is needed.")
    if frames > 1:
        raise MultiFrameError(
            f"The DICOM file holds {frames} frames; only single-frame radiographs are accepted."
        )
    photometric = _text_tag(ds, "PhotometricInterpretation").strip()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise UnsupportedPhotometricError(
            f"Photometric interpretation {photometric[:16] or '(missing)'} is not supported; "
            "a radiograph must be MONOCHROME1 or MONOCHROME2."
        )
    rows, cols = _int_tag(ds, "Rows"), _int_tag(ds, "Columns")
    _check_pixel_cap(rows, cols, max_pixels)  # before any decoding
    if _int_tag(ds, "SamplesPerPixel", default=1) != 1:
        raise UnsupportedPhotometricError("A monochrome image must have one sample per pixel.")
    allocated, stored = _int_tag(ds, "BitsAllocated"), _int_tag(ds, "BitsStored")
    if allocated not in (8, 16, 32):
        raise CorruptImageError(f"BitsAllocated is {allocated}; a radiograph uses 8, 16 or 32.")
    if not 1 <= stored <= allocated:
        raise CorruptImageError(
            f"BitsStored ({stored}) must lie between 1 and BitsAllocated ({allocated})."
        )
    high_bit = _int_tag(ds, "HighBit", default=stored - 1)
    if not stored - 1 <= high_bit < allocated:
        raise CorruptImageError(
            f"HighBit ({high_bit}) must lie between BitsStored - 1 and BitsAllocated - 1."
        )
    if _int_tag(ds, "PixelRepresentation", default=0) not in (0, 1):
        raise CorruptImageError("PixelRepresentation must be 0 (unsigned) or 1 (signed).")

    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is None:
        raise CorruptImageError("The DICOM file has no transfer syntax in its file meta.")
    if not isinstance(tsyntax, str) or not _UID.match(tsyntax):
        raise UnsupportedTransferSyntaxError("The transfer syntax in the file meta is not a UID.")
    with quiet_pydicom():
        _check_decoder(tsyntax)
    pixel_data = ds.PixelData
    if not isinstance(pixel_data, bytes | bytearray):
        raise CorruptImageError("The pixel data element is not binary data.")
    if not getattr(tsyntax, "is_encapsulated", False):  # a pydicom UID here
        expected = rows * cols * allocated // 8
        if len(pixel_data) < expected:
            raise TruncatedFileError(
                f"The pixel data is cut short: {len(pixel_data)} of {expected} bytes."
            )
    else:
        _check_codestream_size(bytes(pixel_data), rows, cols)
        if str(tsyntax) == RLE_LOSSLESS:
            _check_rle_header(bytes(pixel_data), allocated)
    return ds


def decode_dicom(
    source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS, target: int | None = None
) -> DecodedImage:
    """Decode a single-frame monochrome DICOM radiograph.

    Order of operations (PS3.3 C.11): stored values -> Modality LUT or rescale slope/intercept ->
    VOI LUT or window -> [0, 1]; MONOCHROME1 is then inverted so that air is dark.

    `target` (see `decode`): JPEG 2000 is decoded at a reduced resolution level and the grey-level
    steps run on those stored values; every other transfer syntax is decoded exactly, its grey
    levels computed at full resolution, then box-averaged (exact for the grey levels: the
    average of display values, as the full-resolution path's own downscale sees them).
    """
    ds = read_dicom_header(_read_bytes(source), max_pixels=max_pixels)
    tags = _safe_tags(ds)
    rows, cols = _int_tag(ds, "Rows"), _int_tag(ds, "Columns")
    photometric = _text_tag(ds, "PhotometricInterpretation").strip()
    factor = reduction_factor(rows, cols, target)
    geometry: Geometry | None = None
    reduced = None
    # Decoding at a reduced level averages the stored values: exact only where the grey-level
    # mapping up to the window is linear (no VOI LUT, sigmoid or range stretch, which would see
    # averaged values; no padding value, which blended borders no longer match).
    if factor > 1 and _affine_until_window(ds) and "PixelPaddingValue" not in ds:
        reduced = _decode_j2k_reduced(ds, rows, cols, factor) or _decode_jpeg_reduced(
            ds, rows, cols, factor
        )
    if reduced is not None:
        stored, geometry = reduced
    else:
        native = _native_pixels(ds, rows, cols)
        stored = native if native is not None else _dicom_pixel_array(ds, rows, cols)
        if factor > 1 and _affine_until_window(ds):
            # Averaging commutes with the rescale and the window's linear part: average the
            # stored values (16x fewer to map). Only boxes straddling the window's ends differ.
            stored = box_reduce(stored, factor)
            geometry = Geometry((rows, cols), (float(factor), float(factor)))
    pixels = dicom_to_display(stored, ds)
    if factor > 1 and geometry is None:  # a LUT, a sigmoid or a range stretch: map, then average
        pixels = box_reduce(pixels, factor)
        geometry = Geometry((rows, cols), (float(factor), float(factor)))
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels  # MONOCHROME1: low values are bright; flip so air is dark
    age, age_source = patient_age(ds)
    return DecodedImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        format="dicom",
        bits_stored=_int_tag(ds, "BitsStored"),
        photometric=photometric,
        dicom=tags,
        age_years=age,
        age_source=age_source,
        geometry=geometry,
    )


NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit, explicit VR


def _native_pixels(ds: Any, rows: int, cols: int) -> np.ndarray | None:
    """Stored values of uncompressed little-endian 8- or 16-bit pixel data, as `ds.pixel_array`
    gives them (bits above BitsStored cleared, unsigned, or filled with the sign, signed), but
    without its copy and pass: a read-only view of the PixelData bytes when no unused bit is
    set, a new array only where one is. None for anything else (big endian, deflated, 1- or
    32-bit, several samples): pydicom then decodes it."""
    tsyntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    allocated = _int_tag(ds, "BitsAllocated")
    if tsyntax not in NATIVE_LITTLE_ENDIAN or allocated not in (8, 16):
        return None
    if _int_tag(ds, "SamplesPerPixel", default=1) != 1:
        return None
    signed = _int_tag(ds, "PixelRepresentation", default=0) == 1
    stored_bits = _int_tag(ds, "BitsStored")
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    data = ds.PixelData  # its length was checked against rows x cols by read_dicom_header
    values = np.frombuffer(data, dtype=dtype, count=rows * cols).reshape(rows, cols)
    unused = allocated - stored_bits
    if unused == 0:
        return values
    if not signed:
        top = (1 << stored_bits) - 1
        # Most files leave the unused high bits at 0: one max() pass instead of a masked copy.
        return values if int(values.max()) <= top else values & values.dtype.type(top)
    low, high = -(1 << (stored_bits - 1)), (1 << (stored_bits - 1)) - 1
    if low <= int(values.min()) and int(values.max()) <= high:
        return values  # already sign-extended
    return (values << unused) >> unused  # arithmetic shift: the sign bit fills the unused bits


def _dicom_pixel_array(ds: Any, rows: int, cols: int) -> np.ndarray:
    """The stored values at full resolution, with decoder failures as `ImageError`s."""
    try:
        stored = ds.pixel_array
    except (EOFError, struct.error) as exc:
        raise TruncatedFileError("The compressed pixel data ends early: cut short.") from exc
    except BaseException as exc:  # incl. a Rust decoder's PanicException (not an Exception)
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        if "end of" in str(exc).lower() or "truncat" in str(exc).lower():
            raise TruncatedFileError(f"The pixel data is cut short: {exc}") from exc
        raise CorruptImageError(
            f"The pixel data could not be decoded ({type(exc).__name__})."
        ) from exc
    if stored.shape != (rows, cols):
        raise CorruptImageError(f"Decoded shape {stored.shape} does not match {rows}x{cols}.")
    return np.asarray(stored)


# --------------------------------------------------------------------------- reduced decoding


def _exif_orientation(img: Any) -> int | None:
    """A JPEG's EXIF orientation tag (0x0112): None when absent, -1 when unreadable."""
    try:
        value = img.getexif().get(0x0112)
        return int(value) if value is not None else None
    except Exception:  # a damaged EXIF block: reported by the transpose below
        return -1


def _affine_until_window(ds: Any) -> bool:
    """True when the grey-level mapping is rescale slope/intercept then a LINEAR (or
    LINEAR_EXACT) window: affine but for the window's clipping. Anything else, or any tag that
    `_to_display` would refuse, is False (the exact order then runs, with its errors)."""
    try:
        if "ModalityLUTSequence" in ds or "VOILUTSequence" in ds:
            return False
        for tag in ("RescaleSlope", "RescaleIntercept"):
            if tag in ds and ds.get(tag) in (None, ""):
                return False
        float(ds.get("RescaleSlope", 1.0) or 1.0)
        float(ds.get("RescaleIntercept", 0.0) or 0.0)
        centre, width = _first_window(ds)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    except Exception:
        return False
    return (
        centre is not None
        and width is not None
        and width >= 1
        and function in ("LINEAR", "LINEAR_EXACT")
    )


# A reduced decode keeps the shorter side at least this many times the model's input side, so
# that the model's own antialiased downscale still does most of the work (see
# tests/test_reduced_decode.py for what it changes in the model's input).
REDUCE_MARGIN = 2.0
J2K_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")


def reduction_factor(
    rows: int, cols: int, target: int | None, *, power_of_two: bool = False
) -> int:
    """The largest integer factor f (a power of two if asked) with min(rows, cols) / f at least
    `REDUCE_MARGIN * target`; 1 (no reduction) when `target` is None or the image is small."""
    if target is None or target <= 0:
        return 1
    f = max(1, int(min(rows, cols) // (REDUCE_MARGIN * target)))
    if power_of_two:
        f = 1 << (f.bit_length() - 1)
    return f


# --------------------------------------------------------------------------- decode threads

_decode_threads = 1
_decode_pool: Any = None
_pool_size = 0
_POOL_LOCK = threading.Lock()
# OPJ_NUM_THREADS that this package set records its value here too, so that a child process
# (which inherits both) knows the value is not the operator's and may set its own.
_OPJ_MARK = "DIAGNOSTICS_OPJ_NUM_THREADS"
# Below this many pixels a second thread costs more than it saves.
_SPLIT_PIXELS = 1_000_000


def set_decode_threads(n: int) -> None:
    """Threads one decode may use: for the block average of a large image (split by rows), and
    for OpenJPEG's JPEG 2000 decoder (its OPJ_NUM_THREADS, read when a decoder is created; left
    alone when the operator set it). A Scorer sets this when it is built: decoding and its
    model take turns on the same cores. The environment is written only when the value changes
    (in practice once, at start, before any decoding thread runs)."""
    global _decode_threads
    _decode_threads = max(1, int(n))
    current, mark = os.environ.get("OPJ_NUM_THREADS"), os.environ.get(_OPJ_MARK)
    if current is not None and current != mark:
        return  # the operator's choice
    # One thread: no OpenJPEG thread pool at all (the calling thread decodes).
    wanted = str(_decode_threads) if _decode_threads > 1 else None
    if wanted == current:
        return
    if wanted is None:
        os.environ.pop("OPJ_NUM_THREADS", None)
        os.environ.pop(_OPJ_MARK, None)
    else:
        os.environ["OPJ_NUM_THREADS"] = os.environ[_OPJ_MARK] = wanted


def _pool() -> Any:
    global _decode_pool, _pool_size
    with _POOL_LOCK:
        if _decode_pool is None or _pool_size != _decode_threads:
            from concurrent.futures import ThreadPoolExecutor

            if _decode_pool is not None:
                _decode_pool.shutdown(wait=False)  # its running tasks still finish
            _decode_pool = ThreadPoolExecutor(_decode_threads, thread_name_prefix="decode")
            _pool_size = _decode_threads
        return _decode_pool


def box_reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    """(H, W) -> (ceil(H/f), ceil(W/f)) float32: the mean of each f x f block; a last, partial
    block is the mean of the pixels it holds. Integer input is summed exactly (in 32 or 64-bit
    integers), so the result depends on nothing but the pixels. Deterministic: a large image is
    split by whole block rows over the decode threads (`set_decode_threads`), which changes no
    sum."""
    a = np.asarray(pixels)
    if factor <= 1:
        return a.astype(np.float32, copy=False)
    n = min(_decode_threads, a.shape[0] // factor)
    if n > 1 and a.size >= _SPLIT_PIXELS:
        blocks = -(-a.shape[0] // factor)  # block rows, a partial last one included
        step = -(-blocks // n) * factor  # whole block rows per part; the last holds the rest
        parts = [a[i : i + step] for i in range(0, a.shape[0], step)]
        return np.concatenate(list(_pool().map(lambda p: _box_reduce(p, factor), parts)))
    return _box_reduce(a, factor)


def _box_reduce(a: np.ndarray, factor: int) -> np.ndarray:
    if a.dtype.kind in "ui":
        acc: Any = np.int64 if a.dtype.itemsize > 2 or factor > 64 else np.int32
    else:
        acc = np.float64 if a.dtype.itemsize > 4 else np.float32
    f = factor
    h, w = a.shape
    hb, wb = h // f, w // f
    rows = np.empty((-(-h // f), w), dtype=acc)
    body = rows[:hb]
    np.add(a[0 : hb * f : f], a[1 : hb * f : f], out=body, dtype=acc)
    for i in range(2, f):  # row blocks: strided additions of whole rows
        np.add(body, a[i : hb * f : f], out=body)
    if h % f:
        rows[hb] = a[hb * f :].sum(axis=0, dtype=acc)
    out = np.empty((rows.shape[0], -(-w // f)), dtype=acc)
    body = out[:, :wb]
    np.add(rows[:, 0 : wb * f : f], rows[:, 1 : wb * f : f], out=body)
    for j in range(2, f):
        np.add(body, rows[:, j : wb * f : f], out=body)
    if w % f:
        out[:, wb] = rows[:, wb * f :].sum(axis=1, dtype=acc)
    result = out.astype(np.float32)
    result *= np.float32(1.0 / (f * f))
    if h % f:
        result[-1] *= np.float32(f / (h % f))
    if w % f:
        result[:, -1] *= np.float32(f / (w % f))
    return result


def _j2k_levels(codestream: bytes) -> int | None:
    """Decomposition levels from the main header's COD marker; None when not found."""
    i = 2  # after SOC
    while i + 4 <= len(codestream) and i < 4096:
        if codestream[i] != 0xFF:
            return None
        marker = codestream[i + 1]
        length = struct.unpack(">H", codestream[i + 2 : i + 4])[0]
        if marker == 0x52:  # COD: Lcod, Scod, SGcod (4 bytes), SPcod: levels first
            return codestream[i + 9] if i + 9 < len(codestream) else None
        if marker in (0x90, 0x93):  # SOT/SOD: the main header is over
            return None
        i += 2 + length
    return None


def _decode_j2k_reduced(
    ds: Any, rows: int, cols: int, factor: int
) -> tuple[np.ndarray, Geometry] | None:
    """Stored values of a JPEG 2000 image at resolution 2^-k, k the largest with 2^k <= factor,
    decoded by OpenJPEG through Pillow. None whenever this path does not apply or anything about
    it looks unexpected (signed or >16-bit samples, too few levels, a different size, a decoder
    error): the caller then decodes at full resolution, with all its checks and messages."""
    tsyntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    k = factor.bit_length() - 1  # 2^k <= factor
    if tsyntax not in J2K_SYNTAXES or k < 1:
        return None
    if _int_tag(ds, "PixelRepresentation", default=0) != 0:
        return None  # Pillow's J2K decoder has no signed grey mode
    try:
        from pydicom.encaps import generate_frames

        codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
        if codestream[:4] != b"\xff\x4f\xff\x51" or len(codestream) < 43:
            return None
        components = struct.unpack(">H", codestream[40:42])[0]
        ssiz = codestream[42]
        precision, signed = (ssiz & 0x7F) + 1, bool(ssiz & 0x80)
        levels = _j2k_levels(codestream)
        origin = struct.unpack(">II", codestream[16:24])  # XOsiz, YOsiz
        if components != 1 or signed or precision > 16 or levels is None or any(origin):
            return None
        k = min(k, levels)
        if k < 1:
            return None
        stored = _pillow_j2k(codestream, rows, cols, k)
    except Exception:  # a damaged stream: the full decode reports it properly
        return None
    if stored is None:
        return None
    shift = (16 if stored.dtype == np.uint16 else 8) - precision
    if shift > 0:
        stored = stored >> shift  # Pillow scales samples up to its mode's bit depth
    p = float(1 << k)
    return stored, Geometry((rows, cols), (p, p), (-(p - 1) / 2, -(p - 1) / 2))


JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _decode_jpeg_reduced(
    ds: Any, rows: int, cols: int, factor: int
) -> tuple[np.ndarray, Geometry] | None:
    """Stored values of an 8-bit JPEG baseline image decoded with DCT scaling (1/2, 1/4, 1/8;
    libjpeg through Pillow's `draft`). None when this path does not apply or anything looks
    unexpected: the caller then decodes at full resolution, with all its checks and messages.
    12-bit JPEG (1.2.840.10008.1.2.4.51), which Pillow cannot read, takes that path too."""
    from PIL import Image

    tsyntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if tsyntax != JPEG_BASELINE or _int_tag(ds, "BitsStored") != 8:
        return None
    if int(ds.get("PixelRepresentation", 0) or 0) != 0:
        return None  # signed samples: the full decode handles them
    try:
        from pydicom.encaps import generate_frames

        stream = next(generate_frames(ds.PixelData, number_of_frames=1))
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Any = Image.open(io.BytesIO(stream))
        if img.format != "JPEG" or img.mode != "L" or img.size != (cols, rows):
            return None
        p = 1 << (factor.bit_length() - 1)  # the largest power of two <= factor
        p = min(p, 8)
        img.draft("L", (cols // p, rows // p))  # Pillow picks min(full // asked)
        scale = 1
        while scale < p and -(-cols // (scale * 2)) >= img.size[0]:
            scale *= 2
        if scale == 1:
            return None
        img.load()
        stored = np.asarray(img, dtype=np.uint8)
    except Exception:  # a damaged stream: the full decode reports it properly
        return None
    if stored.shape != (-(-rows // scale), -(-cols // scale)):
        return None
    return stored, Geometry((rows, cols), (float(scale), float(scale)))


def _pillow_j2k(codestream: bytes, rows: int, cols: int, k: int) -> np.ndarray | None:
    """Decode resolution level 2^-k. Pillow's own `reduce` rounds the reduced size to nearest
    where OpenJPEG takes the ceiling (its decoder then fails with "broken data stream"), so the
    tile is set up here with OpenJPEG's size."""
    from PIL import Image, ImageFile

    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img: Any = Image.open(io.BytesIO(codestream))
    if img.format != "JPEG2000" or img.size != (cols, rows) or img.mode not in ("I;16", "L"):
        return None
    p = 1 << k
    size = (-(-cols // p), -(-rows // p))
    tile = img.tile[0]
    args = (tile[3][0], k, img.layers, tile[3][3], tile[3][4])
    img._reduce = k
    img._size = size
    img.tile = [ImageFile._Tile(tile[0], (0, 0, *size), tile[2], args)]
    ImageFile.ImageFile.load(img)
    out = np.asarray(img)
    if out.shape != (size[1], size[0]):
        return None
    return out


_AGE_STRING = re.compile(r"^(\d{3})([DWMY])$")  # DICOM AS: 045Y, 018M, 006W, 010D
_DAYS_PER_YEAR = 365.2425
_AGE_UNIT_YEARS = {"D": 1 / _DAYS_PER_YEAR, "W": 7 / _DAYS_PER_YEAR, "M": 1 / 12, "Y": 1.0}


def parse_age_string(value: Any) -> float | None:
    """A DICOM Age String (AS) in years, or None when absent or malformed (never an error)."""
    m = _AGE_STRING.match(str(value or "").strip().upper())
    return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2)] if m else None


def parse_dicom_date(value: Any) -> date | None:
    """A DICOM Date (DA, YYYYMMDD) or None when absent or malformed."""
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None


def patient_age(ds: Any) -> tuple[float | None, str | None]:
    """(age in years, where it came from): `PatientAge`, else `StudyDate - PatientBirthDate`.

    A malformed, missing or impossible value (a birth after the study, over 150 years) is
    unknown: (None, None). Only the age leaves this function; the birth date never does.
    """
    age = parse_age_string(_text_tag(ds, "PatientAge"))
    if age is not None and age <= 150:
        return age, "PatientAge"
    born = parse_dicom_date(_text_tag(ds, "PatientBirthDate"))
    seen = parse_dicom_date(_text_tag(ds, "StudyDate"))
    if born is not None and seen is not None and born <= seen:
        years = (seen - born).days / _DAYS_PER_YEAR
        if years <= 150:
            return years, "StudyDate-PatientBirthDate"
    return None, None


def _text_tag(ds: Any, name: str) -> str:
    """A tag's value as text; '' when absent, binary or multi-valued (all malformed here)."""
    try:
        value = ds.get(name)
    except Exception:  # a damaged element raises on access
        return ""
    if value is None or isinstance(value, bytes | bytearray | list | tuple):
        return ""
    if type(value).__name__ == "MultiValue":
        return ""
    return str(value)


@contextmanager
def quiet_pydicom() -> Iterator[list[warnings.WarningMessage]]:
    """pydicom with its value checks off and its warnings recorded, not printed or logged.

    Its messages quote the offending value ("Invalid value for VR UI: '1.2.840.0113...'"), and
    real devices write such values (leading zeros in UIDs): they must never reach the logs.
    Warning filters and pydicom's settings are process-wide, so one reader at a time: a thread
    never sees another's warnings (the service reads uploads and decodes jobs at once).
    """
    from pydicom import config

    logger = logging.getLogger("pydicom")  # its warn_and_log logs what it warns
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mode = config.settings.reading_validation_mode
        writing = config.settings.writing_validation_mode
        config.settings.reading_validation_mode = config.IGNORE
        config.settings.writing_validation_mode = config.IGNORE  # file meta made from a value
        disabled, logger.disabled = logger.disabled, True
        try:
            yield caught
        finally:
            config.settings.reading_validation_mode = mode
            config.settings.writing_validation_mode = writing
            logger.disabled = disabled


def _convert_all(ds: Any) -> None:
    """Parse every element's value now (pydicom converts lazily, on first access)."""
    if ds is None:
        return
    for elem in ds.iterall():
        try:
            _ = elem.value
        except Exception:  # a damaged element; its checks below refuse it if it matters
            continue


def _no_values(exc: Exception) -> str:
    """An error message with anything quoted in it removed (pydicom quotes tag values)."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", str(exc))[:200]


def _int_tag(ds: Any, name: str, default: int | None = None) -> int:
    """A size or bit-depth tag as an int. Absent: `default`, or CorruptImageError when required.

    Text, binary, multi-valued or fractional values are refused as corrupt: a header that
    says "abc" rows cannot be decoded, and is not the service's failure.
    """
    try:
        value = ds.get(name)
    except Exception:  # a damaged element raises on access
        value = b"?"
    if value is None or value == "":
        if default is None:
            raise CorruptImageError(f"The DICOM file lacks the required tag {name}.")
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise CorruptImageError(f"The DICOM tag {name} is not a single whole number.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CorruptImageError(f"The DICOM tag {name} is not a whole number.") from None
    if not number.is_integer() or abs(number) > 2**31:
        raise CorruptImageError(f"The DICOM tag {name} is not a whole number.")
    return int(number)


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def instance_uid(ds: Any, keyword: str = "SOPInstanceUID") -> str | None:
    """The SOP Instance UID (or another UID element, by keyword) as text; None when absent.
    Several values, binary data or characters other than digits and dots are refused
    (InvalidUIDError): UIDs are the keys for de-duplication and grouping, and go into reports.
    Leading zeros in a component, which the standard forbids but real devices write, are
    accepted as they are."""
    name = {
        "SOPInstanceUID": "SOP Instance UID",
        "StudyInstanceUID": "Study Instance UID",
        "SeriesInstanceUID": "Series Instance UID",
        "SOPClassUID": "SOP Class UID",
    }.get(keyword, keyword)
    try:
        value = ds.get(keyword)
    except Exception:
        raise InvalidUIDError(f"The {name} is damaged.") from None
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidUIDError(f"The {name} must be one UID, not several or binary data.")
    text = value.strip().rstrip("\x00").strip()
    if not text:
        return None
    if len(text) > 64:
        raise InvalidUIDError(f"The {name} is longer than the 64 characters DICOM allows.")
    if not _UID.match(text):
        raise InvalidUIDError(f"The {name} holds characters other than digits and dots.")
    return text


def _check_codestream_size(pixel_data: bytes, rows: int, cols: int) -> None:
    """For compressed pixel data, compare the image size in the codestream header (JPEG, JPEG-LS,
    JPEG 2000) with Rows and Columns, without decoding. RLE carries no size: not checked."""
    from pydicom.encaps import generate_fragments

    try:
        items = generate_fragments(pixel_data)
        next(items, None)  # the Basic Offset Table (often empty)
        first = next(items, b"")
    except Exception as exc:
        msg = "The compressed pixel data is damaged (no valid fragments)."
        raise CorruptImageError(msg) from exc
    if not first:
        raise CorruptImageError("The compressed pixel data holds no image data.")
    size = codestream_size(first)
    if size is not None and size != (rows, cols):
        raise CorruptImageError(
            f"The compressed image is {size[1]}x{size[0]} but the header says {cols}x{rows}."
        )


RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def _check_rle_header(pixel_data: bytes, bits_allocated: int) -> None:
    """An RLE frame starts with a 64-byte header (PS3.5 G.4): the number of segments (one per
    byte of a grey sample) and their offsets, the first at 64, increasing, inside the frame."""
    from pydicom.encaps import generate_fragments

    items = generate_fragments(pixel_data)
    next(items, None)  # the Basic Offset Table
    frame = next(items, b"")
    if len(frame) < 64:
        raise CorruptImageError("The RLE pixel data is shorter than its 64-byte header.")
    header = struct.unpack("<16I", frame[:64])
    count, offsets = header[0], header[1 : 1 + min(header[0], 15)]
    if count != bits_allocated // 8:
        raise CorruptImageError(
            f"The RLE header lists {count} segments; a {bits_allocated}-bit grey image has "
            f"{bits_allocated // 8}."
        )
    bounds = [*offsets, len(frame)]
    if offsets[0] != 64 or any(b <= a for a, b in itertools.pairwise(bounds)):
        raise CorruptImageError("The RLE header's segment offsets are damaged.")


def codestream_size(data: bytes) -> tuple[int, int] | None:
    """(rows, cols) from a JPEG / JPEG-LS SOF marker or a JPEG 2000 SIZ marker; None if neither."""
    if data[:4] == b"\xff\x4f\xff\x51":  # J2K: SOC, SIZ, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz
        if len(data) < 24:
            return None
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[8:24])
        return (ysiz - yo, xsiz - xo) if xsiz > xo and ysiz > yo else None
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        sof = marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE)
        if (sof or marker == 0xF7) and i + 9 <= len(data):  # 0xF7: JPEG-LS SOF55
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return (height, width) if height and width else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _ends_early(ds: Any, caught: list[warnings.WarningMessage]) -> bool:
    """True when pydicom stopped inside an element (defined length) or an undefined-length one."""
    if any("end of file" in str(w.message).lower() for w in caught):
        return True
    elements = list(ds._dict.values())  # raw elements, not yet converted: lengths as declared
    if not elements:
        return False
    last = elements[-1]
    length, value = getattr(last, "length", None), getattr(last, "value", None)
    if length is None or length == 0xFFFFFFFF or not isinstance(value, bytes | bytearray):
        return False
    return len(value) < length


def _check_decoder(tsyntax: Any) -> None:
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise UnsupportedTransferSyntaxError(
            f"Transfer syntax {tsyntax.name} ({tsyntax}) cannot be decoded: "
            "no decoder exists for it."
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise UnsupportedTransferSyntaxError(
            f"Transfer syntax {tsyntax.name} ({tsyntax}) needs a decoder that is not installed "
            f"({missing})."
        )


def _safe_tags(ds: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in SAFE_DICOM_TAGS:
        if name in ds:
            value = ds.get(name)
            if value is None:
                continue
            if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
                out[name] = [_plain(v) for v in value]
            else:
                out[name] = _plain(value)
    return out


def _plain(value: Any) -> int | float | str:
    """A DICOM value as a JSON-friendly scalar (DSfloat -> float, IS -> int, else str)."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def dicom_to_display(stored: np.ndarray, ds: Any) -> np.ndarray:
    """Stored values (H, W) -> float32 display values in [0, 1], before any MONOCHROME1 flip.

    A damaged LUT or rescale tag raises CorruptImageError, never a bare library error.
    """
    try:
        return _to_display(stored, ds)
    except ImageError:
        raise
    except Exception as exc:  # malformed LUT descriptors, empty rescale values, short LUT data
        raise CorruptImageError(
            f"The DICOM grey-level tags (LUT/rescale) are damaged: {exc}"
        ) from exc


def _to_display(stored: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    for tag in ("RescaleSlope", "RescaleIntercept"):
        if tag in ds and ds.get(tag) in (None, ""):
            raise CorruptImageError(f"The DICOM tag {tag} is present but empty.")
    # float32 holds every 16-bit value exactly; float64 would double the cost for nothing.
    values = apply_modality_lut(stored, ds).astype(np.float32)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        return _voi_lut(values, ds.VOILUTSequence[0])
    centre, width = _first_window(ds)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper() or "LINEAR"
    usable = width is not None and (width >= 1 if function == "LINEAR" else width > 0)
    if centre is not None and usable:
        return window(values, centre, float(width), function)  # type: ignore[arg-type]
    # No usable VOI in the file: stretch the value range, ignoring padding outside the body.
    # Deterministic, but image-dependent.
    body = values
    if ds.get("PixelPaddingValue") is not None:
        keep = stored != ds.PixelPaddingValue
        body = values[keep] if keep.any() else values
    lo, hi = float(body.min()), float(body.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    values -= lo
    values *= np.float32(1.0 / (hi - lo))
    return np.clip(values, 0.0, 1.0, out=values)


def _voi_lut(values: np.ndarray, item: Any) -> np.ndarray:
    """Apply a VOI LUT (PS3.3 C.11.2.1.1): entries indexed by modality value - first mapped.

    Done here rather than by pydicom, whose index array wraps for LUTs with 8-bit entries.
    """
    descriptor = item.get("LUTDescriptor")
    if descriptor is None or len(descriptor) != 3:
        raise CorruptImageError("A VOI LUT has no valid LUT Descriptor.")
    n_entries, first, bits = (int(v) for v in descriptor)
    n_entries = n_entries or 65536  # 0 means 2**16 entries
    if not 8 <= bits <= 16:
        raise CorruptImageError(f"A VOI LUT declares {bits}-bit entries; 8 to 16 are allowed.")
    raw = item.get("LUTData")
    if raw is None:
        raise CorruptImageError("A VOI LUT has no LUT Data.")
    lut = (
        np.frombuffer(raw, dtype="<u1" if bits == 8 and len(raw) == n_entries else "<u2")
        if isinstance(raw, bytes)
        else np.asarray(raw if isinstance(raw, (list, tuple)) or hasattr(raw, "__len__") else [raw])
    ).astype(np.float32)
    if lut.size < n_entries:
        raise CorruptImageError(f"A VOI LUT holds {lut.size} entries, not {n_entries}.")
    index = np.clip(np.rint(values) - first, 0, n_entries - 1).astype(np.intp)
    out = lut[:n_entries][index]
    out *= np.float32(1.0 / (2**bits - 1))
    return np.clip(out, 0.0, 1.0, out=out)


def _first_window(ds: Any) -> tuple[float | None, float | None]:
    def first(name: str) -> float | None:
        if name not in ds or ds.get(name) in (None, ""):
            return None
        value = ds.get(name)
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return float(value)

    return first("WindowCenter"), first("WindowWidth")


def window(values: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) onto [0, 1]. Values are modality values (e.g. HU)."""
    values = np.asarray(values, dtype=np.float32)
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - np.float32(centre)) / np.float32(width)))
        return np.clip(out, 0.0, 1.0).astype(np.float32)
    if function == "LINEAR_EXACT":
        offset, scale = centre, width
    else:  # LINEAR, the default
        if width < 1:
            raise CorruptImageError(f"Window width {width} is below 1, which LINEAR forbids.")
        offset, scale = centre - 0.5, max(width - 1.0, 1e-9)
    # out = (v - offset) / scale + 0.5, as one affine map in float32
    a = np.float32(1.0 / scale)
    b = np.float32(0.5 - offset / scale)
    out = values * a
    out += b
    return np.clip(out, 0.0, 1.0, out=out)


# --------------------------------------------------------------------------- PNG / JPEG


def _open_bitmap(data: bytes, max_pixels: int) -> Any:
    """Open a PNG or JPEG header with Pillow and check format, size and frame count."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # Pillow warns above 89 Mpx and raises above 179 Mpx; our own cap decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"The image header claims a size over Pillow's hard limit ({exc}). "
            "It was refused before decoding."
        ) from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedFormatError("The file is not an image Pillow can read.") from exc
    except Exception as exc:  # a damaged header
        raise CorruptImageError(f"The image header could not be read: {exc}") from exc
    fmt = (img.format or "").lower()
    if fmt not in ("png", "jpeg"):
        raise UnsupportedFormatError(f"Image format {img.format} is not accepted; use PNG or JPEG.")
    width, height = img.size
    _check_pixel_cap(height, width, max_pixels)  # before the pixels are decompressed
    if getattr(img, "n_frames", 1) > 1:
        raise MultiFrameError("The image is animated (several frames); one frame is expected.")
    return img


def decode_bitmap(
    source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS, target: int | None = None
) -> DecodedImage:
    """Decode PNG (8- or 16-bit) or JPEG to grey; RGB, RGBA and palette images are converted.

    `chroma` records how coloured the source was (mean channel spread, 0 for grey), so that
    QC can refuse a colour photograph, which the grey conversion would otherwise hide.

    `target` (see `decode`): a JPEG is decoded with DCT scaling (1/2, 1/4, 1/8); a PNG is
    decoded exactly and then box-averaged.
    """
    from PIL import ImageOps

    img = _open_bitmap(_read_bytes(source), max_pixels)
    fmt = img.format.lower()
    full_w, full_h = img.size
    scale = 1
    # DCT scaling only without an EXIF rotation: after a transpose the partial last block would
    # come first and shift the image; a rotated photo is decoded in full and box-averaged.
    if fmt == "jpeg" and target is not None and _exif_orientation(img) in (None, 1):
        p = reduction_factor(full_h, full_w, target, power_of_two=True)
        if p > 1:
            img.draft(img.mode, (full_w // p, full_h // p))  # Pillow: min(full // asked)
            while scale < p and -(-full_w // (scale * 2)) >= img.size[0]:
                scale *= 2  # the DCT scale Pillow chose: size = ceil(full / scale)
    _load_bitmap(img)
    if _has_alpha(img):
        _check_opaque(img)
    if fmt == "jpeg":
        try:
            img = ImageOps.exif_transpose(img)  # phone photos of films carry a rotation tag
        except Exception as exc:  # a damaged EXIF block: the orientation is unknown
            raise CorruptImageError(
                "The JPEG's EXIF block (which holds its orientation) is damaged."
            ) from exc

    mode = img.mode
    chroma = 0.0
    raw: np.ndarray | None = None  # integer samples, divided by `top` below
    top = 255.0
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        raw, top = np.asarray(img, dtype=np.uint16), 65535.0
        bits = 16
    elif mode == "I":  # 32-bit integer; Pillow's mode for some 16-bit PNGs
        pixels = np.clip(np.asarray(img, dtype=np.float64) / 65535.0, 0, 1).astype(np.float32)
        bits = 16
    elif mode == "F":
        raise UnsupportedFormatError("Floating-point images are not accepted.")
    else:
        if mode == "P":
            img = img.convert("RGBA")
        if mode in ("RGBA", "LA", "PA") or img.mode in ("RGBA", "LA"):
            img = img.convert("RGB" if img.mode == "RGBA" else "L")  # alpha is dropped
        if img.mode in ("RGB", "CMYK", "YCbCr"):
            chroma = _chroma(np.asarray(img.convert("RGB")))
        if img.mode != "L":
            img = img.convert("L")  # ITU-R 601-2 luma for RGB/CMYK/YCbCr
        raw = np.asarray(img, dtype=np.uint8)
        bits = 8
    geometry = None
    if target is not None and scale > 1:  # DCT-scaled JPEG
        # After an EXIF rotation the full image's rows and columns swap with the pixels'.
        size = raw.shape if raw is not None else pixels.shape
        rotated = (size[0] > size[1]) != (full_h > full_w)
        source_shape = (full_w, full_h) if rotated else (full_h, full_w)
        geometry = Geometry(source_shape, (float(scale), float(scale)))
    elif target is not None:  # decoded in full: average blocks (of the integer samples)
        size = raw.shape if raw is not None else pixels.shape
        scale = reduction_factor(size[0], size[1], target)
        if scale > 1:
            geometry = Geometry((int(size[0]), int(size[1])), (float(scale), float(scale)))
            if raw is not None:
                pixels = box_reduce(raw, scale)
                pixels /= np.float32(top)
                raw = None
            else:
                pixels = box_reduce(pixels, scale)
    if raw is not None:
        pixels = raw.astype(np.float32) / top
    return DecodedImage(
        pixels=pixels,
        format=fmt,
        bits_stored=bits,
        photometric="MONOCHROME2",
        chroma=chroma,
        geometry=geometry,
    )


def _load_bitmap(img: Any) -> None:
    try:
        img.load()
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise TruncatedFileError("The image file ends early: it was cut short.") from exc
        raise CorruptImageError(f"The image could not be decoded: {exc}") from exc
    except Exception as exc:  # zlib errors and the like, from damaged files
        raise CorruptImageError(f"The image could not be decoded: {exc}") from exc


def _has_alpha(img: Any) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info


# More than this fraction of pixels not fully opaque: the image is refused, not guessed at.
MAX_TRANSPARENT_FRACTION = 0.001


def _check_opaque(img: Any) -> None:
    """Refuse an image with transparent areas: what lies under them (black? white? a viewer's
    chequerboard?) is unknown, and a fully transparent image holds no picture at all. An alpha
    channel that is opaque everywhere, as many exporters write, is fine (and then dropped)."""
    rgba = img if img.mode in ("RGBA", "LA") else img.convert("RGBA")  # no copy when it has A
    alpha = np.asarray(rgba.getchannel("A"))
    fraction = float((alpha < 255).mean())
    if fraction > MAX_TRANSPARENT_FRACTION:
        raise TransparentImageError(
            f"The image is {fraction:.1%} transparent: a radiograph is opaque. "
            "Export it again without transparency (no alpha channel)."
        )


def _chroma(rgb: np.ndarray) -> float:
    """Mean spread between the channels of (H, W, 3) uint8, in [0, 1]; about 0 for grey images.

    Measured on a subsample of at most ~250k pixels: JPEG noise on a grey film stays near 0.01.
    """
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 250_000)))
    sub = rgb[::step, ::step].astype(np.int16)
    spread = sub.max(axis=-1) - sub.min(axis=-1)
    return float(spread.mean() / 255.0)


def _check_pixel_cap(rows: int, cols: int, max_pixels: int) -> None:
    if rows <= 0 or cols <= 0:
        raise CorruptImageError(f"The image has no pixels ({rows}x{cols}).")
    if rows * cols > max_pixels:
        raise ImageTooLargeError(
            f"The image is {cols}x{rows} = {rows * cols:,} pixels, over the limit of "
            f"{max_pixels:,}. It was refused before decoding."
        )


# --------------------------------------------------------------------------- preprocessing


def preprocess(
    pixels: np.ndarray, spec: PreprocessSpec, *, geometry: Geometry | None = None
) -> np.ndarray:
    """Decoded grey image (H, W) in [0, 1] -> model input (C, S, S) float32.

    Deterministic: square it (crop, letterbox or squash), resize with antialiasing (Pillow's
    bilinear filter on float32, which widens its support when shrinking), normalise, repeat to
    C channels. Equal to `normalize(resize_square(pixels, spec), spec)`. `geometry`: that of a
    reduced decode (`DecodedImage.geometry`), see `resize_square`.
    """
    return normalize(resize_square(pixels, spec, geometry=geometry), spec)


def resize_square(
    pixels: np.ndarray, spec: PreprocessSpec, *, geometry: Geometry | None = None
) -> np.ndarray:
    """The geometric half of `preprocess`: (H, W) in [0, 1] -> (S, S) float32 in [0, 1].

    With the `geometry` of a reduced decode, the output samples the same points of the image as
    the full-resolution path does (same square, same crop or letterbox offsets, to a fraction of
    a source pixel), only from the reduced pixels.
    """
    from PIL import Image

    if pixels.ndim != 2:
        raise ValueError(f"expected a grey image (H, W), got shape {pixels.shape}")
    img = np.asarray(pixels, dtype=np.float32)
    if not np.isfinite(img).all():
        raise ValueError("image holds NaN or Inf")
    if geometry is not None:
        return _resize_reduced(img, spec, geometry)
    img = square(img, spec.crop)
    size = spec.size
    if img.shape != (size, size):
        resized = Image.fromarray(img, mode="F").resize((size, size), Image.Resampling.BILINEAR)
        img = np.asarray(resized, dtype=np.float32)
    return np.clip(img, 0.0, 1.0)  # (S, S)


def _resize_reduced(img: np.ndarray, spec: PreprocessSpec, geometry: Geometry) -> np.ndarray:
    from PIL import Image

    rows, cols = geometry.source_shape
    # The region of the full image (continuous coordinates, y0, x0, y1, x1) that the
    # full-resolution path's square covers: see `square`.
    if rows == cols or spec.crop == "squash":
        region = (0.0, 0.0, float(rows), float(cols))
    elif spec.crop == "center":
        side = min(rows, cols)
        top, left = (rows - side) // 2, (cols - side) // 2
        region = (float(top), float(left), float(top + side), float(left + side))
    elif spec.crop == "letterbox":
        side = max(rows, cols)
        top, left = (side - rows) // 2, (side - cols) // 2
        region = (float(-top), float(-left), float(side - top), float(side - left))
    else:
        raise ValueError(f"unknown crop policy {spec.crop!r}")
    (sy, sx), (oy, ox) = geometry.scale, geometry.offset
    y0, x0 = (region[0] - oy) / sy, (region[1] - ox) / sx
    y1, x1 = (region[2] - oy) / sy, (region[3] - ox) / sx
    h, w = img.shape
    # Letterbox padding lies outside the image: pad the reduced pixels with zeros (air) as far
    # as the square reaches. Elsewhere the square ends where the image does; an overhang there
    # is a fraction of a pixel (the phase of a JPEG 2000 level, a partial last block): clamp.
    pad_y = region[0] < 0 or region[2] > rows
    pad_x = region[1] < 0 or region[3] > cols
    top = int(np.ceil(max(0.0, -y0))) if pad_y else 0
    bottom = int(np.ceil(max(0.0, y1 - h))) if pad_y else 0
    left = int(np.ceil(max(0.0, -x0))) if pad_x else 0
    right = int(np.ceil(max(0.0, x1 - w))) if pad_x else 0
    if top or bottom or left or right:
        img = np.pad(img, ((top, bottom), (left, right)))
        # Next to the padding, a reduced pixel that straddles the image's edge holds the mean
        # of the image part only; the full path's square has zeros in the rest. Weight it by
        # the part inside, as a box average of the padded square would.
        if pad_y:
            _fade_edges(img, 0, top + (0 - oy) / sy, top + (rows - oy) / sy)
        if pad_x:
            _fade_edges(img, 1, left + (0 - ox) / sx, left + (cols - ox) / sx)
    h, w = img.shape
    box = (
        min(max(x0 + left, 0.0), float(w)),
        min(max(y0 + top, 0.0), float(h)),
        min(max(x1 + left, 0.0), float(w)),
        min(max(y1 + top, 0.0), float(h)),
    )
    size = spec.size
    resized = Image.fromarray(img, mode="F").resize(
        (size, size), Image.Resampling.BILINEAR, box=box
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _fade_edges(img: np.ndarray, axis: int, start: float, end: float) -> None:
    """In place: scale the pixels (along `axis`) that the image's edges at `start` and `end`
    (continuous coordinates) cut, by the fraction of each that lies inside the image."""
    view = img if axis == 0 else img.T
    n = view.shape[0]
    i0 = int(np.floor(start))
    if 0 <= i0 < n and start > i0:
        view[i0] *= np.float32(1.0 - (start - i0))
    i1 = int(np.floor(end))
    if 0 <= i1 < n and end > i1:
        view[i1] *= np.float32(end - i1)


def normalize(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The intensity half of `preprocess`: (..., S, S) in [0, 1] -> (..., C, S, S) float32."""
    out = np.repeat(np.asarray(img, dtype=np.float32)[..., None, :, :], spec.channels, axis=-3)
    if spec.normalize == "imagenet":
        mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    elif spec.normalize == "fixed":
        mean, std = np.array(spec.mean), np.array(spec.std)
    else:
        return np.ascontiguousarray(out, dtype=np.float32)
    mean = np.broadcast_to(mean, (spec.channels,)).astype(np.float32)[:, None, None]
    std = np.broadcast_to(std, (spec.channels,)).astype(np.float32)[:, None, None]
    return np.ascontiguousarray((out - mean) / std, dtype=np.float32)


def square(img: np.ndarray, crop: str) -> np.ndarray:
    """Make (H, W) square: 'center' crops the long side, 'letterbox' pads with 0, 'squash' keeps."""
    h, w = img.shape
    if h == w or crop == "squash":
        return img
    if crop == "center":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return img[top : top + side, left : left + side]
    if crop == "letterbox":
        side = max(h, w)
        out = np.zeros((side, side), dtype=img.dtype)
        top, left = (side - h) // 2, (side - w) // 2
        out[top : top + h, left : left + w] = img
        return out
    raise ValueError(f"unknown crop policy {crop!r}")


def load_for_model(
    source: Source, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode and preprocess in one step: file -> (C, S, S) float32."""
    return preprocess(decode(source, max_pixels=max_pixels).pixels, spec)
