"""PNG and JPEG decoding: bit depths, colour conversion, and refusals."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diagnostics import imaging as I
from tests.conftest import shared


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_8bit_grey():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = I.decode(_encode(Image.fromarray(arr)))
    assert img.format == "png" and img.bits_stored == 8
    np.testing.assert_allclose(img.pixels, arr / 255.0, atol=1e-7)


def test_png_16bit_grey_keeps_precision():
    arr = (np.arange(64 * 64, dtype=np.uint32) * 16).astype(np.uint16).reshape(64, 64)
    data = _encode(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    img = I.decode(data)
    assert img.bits_stored == 16
    np.testing.assert_allclose(img.pixels, arr / 65535.0, atol=1e-7)
    assert len(np.unique(img.pixels)) == 4096  # more levels than 8 bits could hold


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_modes_become_grey(mode):
    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (8, 1))
    rgb = Image.fromarray(np.stack([grey] * 3, axis=-1))
    if mode == "RGBA":
        src = rgb.convert("RGBA")
    elif mode == "P":
        src = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    elif mode == "LA":
        src = Image.fromarray(grey).convert("LA")
    else:
        src = rgb
    img = I.decode(_encode(src))
    assert img.pixels.ndim == 2
    np.testing.assert_allclose(img.pixels, grey / 255.0, atol=2 / 255)


def test_jpeg_grey_and_rgb():
    grey = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)
    for src in (Image.fromarray(grey), Image.fromarray(grey).convert("RGB")):
        img = I.decode(_encode(src, "JPEG", quality=95))
        assert img.format == "jpeg" and img.pixels.shape == (64, 64)
        assert np.abs(img.pixels - grey / 255.0).mean() < 0.01


def test_jpeg_exif_rotation_is_applied():
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    data = _encode(Image.fromarray(arr), "JPEG", quality=100, exif=exif.tobytes())
    img = I.decode(data)
    assert img.shape == (40, 20)
    assert img.pixels[:20].mean() > 0.9 and img.pixels[20:].mean() < 0.1  # white is now on top


def _with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    # IHDR is the first chunk: 8-byte signature, length, type, 13 data bytes, CRC.
    data = bytearray(png)
    struct.pack_into(">II", data, 16, width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    struct.pack_into(">I", data, 29, crc)
    return bytes(data)


def test_decompression_bomb_refused_from_the_header():
    small = _encode(Image.fromarray(np.zeros((8, 8), dtype=np.uint8)))
    for side in (10_000, 100_000):  # 100 Mpx (Pillow only warns) and 10 Gpx (Pillow raises)
        bomb = _with_ihdr_size(small, side, side)  # holds 64 pixels
        with pytest.raises(I.ImageTooLargeError, match="before decoding"):
            I.decode(bomb)


def test_pixel_cap_applies_to_png_and_jpeg():
    arr = np.zeros((100, 100), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        with pytest.raises(I.ImageTooLargeError):
            I.decode(_encode(Image.fromarray(arr), fmt), max_pixels=9_999)
        assert I.decode(_encode(Image.fromarray(arr), fmt), max_pixels=10_000).shape == (100, 100)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_bitmap_refused(fmt):
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)), fmt)
    with pytest.raises((I.TruncatedFileError, I.CorruptImageError)) as err:
        I.decode(data[: len(data) // 2])
    assert err.value.code in ("truncated_file", "corrupt_image")


def test_truncated_png_names_the_cause():
    rng = np.random.default_rng(1)
    data = _encode(Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)))
    with pytest.raises(I.TruncatedFileError):
        I.decode(data[: len(data) - 100])


def test_other_formats_refused():
    with pytest.raises(I.UnsupportedFormatError):
        I.decode(_encode(Image.fromarray(np.zeros((8, 8), np.uint8)), "GIF"))
    with pytest.raises(I.UnsupportedFormatError):
        I.decode_bitmap(_encode(Image.fromarray(np.zeros((8, 8), np.uint8)), "BMP"))


def test_real_kermany_jpeg_and_nih_png():
    k = I.decode(shared("cxr", "kermany224", "NORMAL", "IM-0115-0001.jpeg"))
    assert k.format == "jpeg" and k.shape == (224, 224)
    n = I.decode(shared("cxr", "nih_sample", "images", "00000211_013.png"))
    assert n.format == "png" and n.shape == (1024, 1024) and n.bits_stored == 8
