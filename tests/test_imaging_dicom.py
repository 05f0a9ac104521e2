"""DICOM decoding on the real radiographs in ../shared/data/dicom, and every refusal."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames

from diagnostics import imaging as I
from diagnostics.data.synthetic import dicom_dataset, to_stored
from tests.conftest import shared

UNCR = "pydicom-data_RG1_UNCR.dcm"  # chest CR, MONOCHROME1, 15 bits, uncompressed
J2KR = "pydicom-data_RG1_J2KR.dcm"  # same image, JPEG 2000 lossless
JLSN = "WG04_RG1_JLSN.dcm"  # same image, JPEG-LS near-lossless
RLE = "WG04_RG3_RLE.dcm"  # extremity CR, RLE lossless


def _stored(name: str) -> np.ndarray:
    return pydicom.dcmread(shared("dicom", name)).pixel_array


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _synthetic(**changes) -> pydicom.Dataset:
    pixels = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48)
    ds = dicom_dataset(
        to_stored(pixels, 12, "MONOCHROME2"), bits=12, photometric="MONOCHROME2", uid_seed="test"
    )
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("name", [UNCR, J2KR, JLSN])
def test_real_monochrome1_chest_decodes_in_three_encodings(name):
    img = I.decode(shared("dicom", name))
    assert img.format == "dicom"
    assert img.photometric == "MONOCHROME1"
    assert img.shape == (1955, 1841)
    assert img.pixels.dtype == np.float32
    assert 0.0 <= img.pixels.min() < img.pixels.max() <= 1.0
    assert img.dicom["BodyPartExamined"] == "CHEST"
    assert img.bits_stored == 15


def test_lossless_forms_are_identical():
    assert np.array_equal(_stored(UNCR), _stored(J2KR))
    a = I.decode(shared("dicom", UNCR)).pixels
    b = I.decode(shared("dicom", J2KR)).pixels
    assert np.array_equal(a, b)


def test_near_lossless_within_its_stated_error():
    # JPEG-LS states its bound in the scan header: NEAR, the largest error per stored value.
    ds = pydicom.dcmread(shared("dicom", JLSN))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    sos = frame.find(b"\xff\xda")
    components = frame[sos + 4]
    near = frame[sos + 5 + 2 * components]
    assert near > 0  # really lossy
    diff = np.abs(_stored(UNCR).astype(np.int32) - _stored(JLSN).astype(np.int32))
    assert 0 < diff.max() <= near
    # After the 30000-wide window, display values move by at most near / (width - 1).
    a = I.decode(shared("dicom", UNCR)).pixels
    b = I.decode(shared("dicom", JLSN)).pixels
    assert np.abs(a - b).max() <= near / (30000 - 1) + 1e-6


def test_monochrome1_is_inverted_so_lungs_are_darker_than_mediastinum():
    px = I.decode(shared("dicom", UNCR)).pixels
    h, w = px.shape

    def patch(r: float, c: float) -> float:
        return float(
            np.median(
                px[
                    int((r - 0.05) * h) : int((r + 0.05) * h),
                    int((c - 0.05) * w) : int((c + 0.05) * w),
                ]
            )
        )

    mediastinum = patch(0.35, 0.5)
    lungs = [patch(0.35, 0.28), patch(0.35, 0.72)]
    assert all(lung < mediastinum - 0.15 for lung in lungs), (lungs, mediastinum)
    # Raw MONOCHROME1 values are the other way round: low = bright.
    raw = _stored(UNCR).astype(np.float64)
    assert np.median(raw[int(0.3 * h) : int(0.4 * h), int(0.23 * w) : int(0.33 * w)]) > np.median(
        raw[int(0.3 * h) : int(0.4 * h), int(0.45 * w) : int(0.55 * w)]
    )


def test_rle_decodes():
    img = I.decode(shared("dicom", RLE))
    assert img.shape == (1760, 1760)
    assert img.dicom["BodyPartExamined"] == "EXTREMITY"  # for QC to refuse later
    assert img.pixels.std() > 0.05


def test_small_8bit_dx_decodes():
    img = I.decode(shared("dicom", "highdicom_dx_image.dcm"))
    assert img.bits_stored == 8 and img.shape == (169, 211)


def test_patient_identity_never_leaves_the_decoder():
    img = I.decode(shared("dicom", UNCR))
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(img.dicom)


# --------------------------------------------------------------------------- refusals


def test_refuses_real_file_without_pixel_data():
    with pytest.raises(I.NoPixelDataError) as err:
        I.decode(shared("dicom", "pydicom_bundled_chrJapMulti_CR_32x32.dcm"))
    assert err.value.code == "no_pixel_data"


def test_refuses_synthetic_file_without_pixel_data():
    ds = _synthetic()
    del ds.PixelData
    with pytest.raises(I.NoPixelDataError):
        I.decode(_bytes(ds))


def test_refuses_multi_frame():
    ds = _synthetic()
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(I.MultiFrameError, match="2 frames"):
        I.decode(_bytes(ds))


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL", "PALETTE COLOR"])
def test_refuses_unsupported_photometric(photometric):
    with pytest.raises(I.UnsupportedPhotometricError, match=photometric):
        I.decode(_bytes(_synthetic(PhotometricInterpretation=photometric)))


def test_refuses_transfer_syntax_without_any_decoder():
    ds = _synthetic()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.92"  # JPEG 2000 Part 2 multi-component
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 16])
    with pytest.raises(I.UnsupportedTransferSyntaxError) as err:
        I.decode(_bytes(ds))
    assert err.value.code == "unsupported_transfer_syntax"


def test_refuses_jpeg_ls_when_its_decoder_is_not_installed():
    # A clinic machine without pylibjpeg (nor pyjpegls, which highdicom brings): hide them in a
    # fresh interpreter. (JPEG 2000 would still decode through Pillow's openjpeg.)
    path = shared("dicom", JLSN)
    code = (
        "import sys; sys.modules['pylibjpeg'] = None; sys.modules['libjpeg'] = None\n"
        "sys.modules['jpeg_ls'] = None\n"
        "from diagnostics import imaging as I\n"
        f"try:\n    I.decode({str(path)!r})\n"
        "except I.UnsupportedTransferSyntaxError as e:\n    print('REFUSED', e.code, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "REFUSED unsupported_transfer_syntax" in out.stdout, out.stdout + out.stderr
    assert "JPEG-LS" in out.stdout and "pylibjpeg-libjpeg" in out.stdout


@pytest.mark.parametrize("name", [UNCR, J2KR, JLSN, RLE])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_refuses_truncated_real_files(name, fraction):
    data = shared("dicom", name).read_bytes()
    with pytest.raises(I.TruncatedFileError) as err:
        I.decode(data[: int(len(data) * fraction)])
    assert err.value.code == "truncated_file"


def test_refuses_file_cut_inside_the_header():
    data = shared("dicom", UNCR).read_bytes()
    with pytest.raises(I.TruncatedFileError):
        I.decode(data[:400])


def test_pixel_cap_is_checked_before_decoding():
    # The header claims 60000 x 60000 but holds 16 bytes: a decode attempt would report a
    # truncated file, so refusing as too large proves the cap ran first.
    ds = _synthetic(Rows=60000, Columns=60000)
    ds.PixelData = b"\x00" * 16
    with pytest.raises(I.ImageTooLargeError, match="before decoding"):
        I.decode(_bytes(ds))


def test_pixel_cap_is_configurable_on_a_real_file():
    path = shared("dicom", UNCR)
    with pytest.raises(I.ImageTooLargeError):
        I.decode(path, max_pixels=1_000_000)
    assert I.decode(path, max_pixels=4_000_000).shape == (1955, 1841)


def test_refuses_non_dicom_and_empty_input():
    with pytest.raises(I.UnsupportedFormatError):
        I.decode(b"")
    with pytest.raises(I.UnsupportedFormatError):
        I.decode(b"hello, this is not an image" * 10)
    with pytest.raises(I.UnsupportedFormatError):
        I.decode_dicom(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)  # never force-read as DICOM


# --------------------------------------------------------------------------- pixel pipeline


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_bits_and_photometric_round_trip(bits, photometric):
    rng = np.random.default_rng(0)
    pixels = rng.random((40, 30)).astype(np.float32)
    top = 2**bits - 1
    stored = to_stored(pixels, bits, photometric)
    ds = dicom_dataset(stored, bits=bits, photometric=photometric, uid_seed="rt")
    if bits == 8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = stored.astype(np.uint8).tobytes()
    out = I.decode(_bytes(ds)).pixels
    assert np.abs(out - pixels).max() <= 0.5 / top + 1e-6


def test_signed_pixels_with_rescale_and_window():
    # CT-like signed values in HU: stored s, HU = s * 1 - 1024, window centre -600 width 1500.
    stored = np.array([[-2000, -1000], [0, 2000]], dtype=np.int16)
    ds = _synthetic(Rows=2, Columns=2)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = -600, 1500
    ds.PixelData = stored.astype("<i2").tobytes()
    out = I.decode(_bytes(ds)).pixels
    hu = stored.astype(np.float64) - 1024
    expected = np.clip((hu - (-600 - 0.5)) / (1500 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_voi_lut_sequence_is_applied():
    ds = _synthetic(Rows=1, Columns=4)
    ds.PixelData = np.array([0, 1, 2, 3], dtype="<u2").tobytes()
    item = pydicom.Dataset()
    item.LUTDescriptor = [4, 0, 8]  # 4 entries, first value 0, 8-bit output
    item.add_new(0x00283006, "US", [0, 255, 128, 64])  # LUTData
    ds.VOILUTSequence = [item]
    del ds.WindowCenter, ds.WindowWidth
    out = I.decode(_bytes(ds)).pixels
    np.testing.assert_allclose(out[0], np.array([0, 255, 128, 64]) / 255, atol=1e-6)


def test_large_voi_lut_with_8bit_entries():
    # 12-bit stored values through a 4096-entry LUT with 8-bit output (a common CR export).
    stored = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    ds = _synthetic(Rows=64, Columns=64)
    ds.PixelData = stored.astype("<u2").tobytes()
    lut = (np.arange(4096) // 16).astype(np.uint16)  # ramp 0..255
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.add_new(0x00283006, "US", lut.tolist())
    ds.VOILUTSequence = [item]
    del ds.WindowCenter, ds.WindowWidth
    out = I.decode(_bytes(ds)).pixels
    np.testing.assert_allclose(out, (stored // 16) / 255.0, atol=1e-6)


@pytest.mark.parametrize(
    "damage",
    ["empty_slope", "empty_rows", "lut_no_descriptor", "lut_20bit", "lut_short", "modality_lut_12"],
)
def test_damaged_grey_level_tags_are_refused_cleanly(damage):
    ds = _synthetic()
    item = pydicom.Dataset()
    if damage == "empty_slope":
        ds.RescaleSlope = None
    elif damage == "empty_rows":
        ds.Rows = None
    elif damage == "lut_no_descriptor":
        item.add_new(0x00283006, "US", [0, 1, 2])
        ds.VOILUTSequence = [item]
    elif damage == "lut_20bit":
        item.LUTDescriptor = [3, 0, 20]  # the standard allows 8 to 16
        item.add_new(0x00283006, "US", [0, 1, 2])
        ds.VOILUTSequence = [item]
    elif damage == "lut_short":
        item.LUTDescriptor = [4096, 0, 12]
        item.add_new(0x00283006, "US", [0, 1, 2])
        ds.VOILUTSequence = [item]
    elif damage == "modality_lut_12":
        item.LUTDescriptor = [3, 0, 12]
        item.ModalityLUTType = "US"
        item.add_new(0x00283006, "US", [0, 1, 2])
        ds.ModalityLUTSequence = [item]
    with pytest.raises(I.CorruptImageError):
        I.decode(_bytes(ds))


def test_pixel_padding_is_ignored_by_the_range_stretch():
    stored = np.full((8, 8), 4095, dtype=np.uint16)  # padding outside the body
    stored[2:6, 2:6] = np.arange(100, 116).reshape(4, 4)
    ds = _synthetic(Rows=8, Columns=8)
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.PixelPaddingValue = 4095
    del ds.WindowCenter, ds.WindowWidth
    out = I.decode(_bytes(ds)).pixels
    assert out[2, 2] == 0.0 and out[5, 5] == pytest.approx(1.0)


def test_no_voi_stretches_the_value_range():
    ds = _synthetic()
    del ds.WindowCenter, ds.WindowWidth
    out = I.decode(_bytes(ds)).pixels
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_functions_are_monotone_and_bounded(function):
    values = np.linspace(-100, 100, 201)
    out = I.window(values, 0.0, 100.0, function)
    assert out.min() >= 0 and out.max() <= 1 and np.all(np.diff(out) >= 0)
    assert out[100] == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------- native pixels in place


def _native_case(allocated: int, stored_bits: int, signed: bool, garbage: bool, tsyntax: str):
    rng = np.random.default_rng(allocated * 100 + stored_bits + 7 * signed + 3 * garbage)
    lo, hi = (
        (-(1 << (stored_bits - 1)), 1 << (stored_bits - 1)) if signed else (0, 1 << stored_bits)
    )
    values = rng.integers(lo, hi, size=(37, 29))
    raw = values.astype(np.int64) & ((1 << allocated) - 1)  # two's complement in `allocated` bits
    if garbage:  # overlay bits or noise above BitsStored, which readers must ignore
        noise = rng.integers(0, 1 << (allocated - stored_bits), size=values.shape)
        raw = (raw & ((1 << stored_bits) - 1)) | (noise << stored_bits)
    ds = _synthetic(Rows=37, Columns=29)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored_bits, stored_bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = raw.astype(f"<u{allocated // 8}").tobytes()
    ds.file_meta.TransferSyntaxUID = tsyntax
    return ds, values


@pytest.mark.parametrize("tsyntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
@pytest.mark.parametrize(
    "allocated,stored_bits,signed,garbage",
    [
        (a, b, signed, garbage)
        for a, b, signed in [
            (8, 8, False),
            (8, 6, False),
            (16, 16, False),
            (16, 12, False),
            (16, 15, False),
            (16, 16, True),
            (16, 12, True),
            (8, 7, True),
        ]
        for garbage in ([False, True] if b < a else [False])  # garbage: in the unused bits
    ],
)
def test_native_pixels_read_in_place_equal_pydicom(
    tsyntax, allocated, stored_bits, signed, garbage
):
    ds, values = _native_case(allocated, stored_bits, signed, garbage, tsyntax)
    parsed = I.read_dicom_header(_bytes(ds))
    ours = I._native_pixels(parsed, 37, 29)
    assert ours is not None
    if not garbage:  # nothing to clear: the PixelData bytes themselves, not a copy
        assert not ours.flags.writeable and np.shares_memory(
            ours, np.frombuffer(parsed.PixelData, np.uint8)
        )
    theirs = pydicom.dcmread(io.BytesIO(_bytes(ds))).pixel_array
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, values)


def test_native_pixels_leave_other_encodings_to_pydicom():
    ds, _ = _native_case(16, 12, False, False, "1.2.840.10008.1.2.2")  # big endian
    assert I._native_pixels(ds, 37, 29) is None
    ds, _ = _native_case(16, 12, False, False, "1.2.840.10008.1.2.1")
    ds.BitsAllocated = 32
    assert I._native_pixels(ds, 37, 29) is None


def test_real_uncompressed_files_read_in_place_equal_pydicom():
    checked = 0
    for path in sorted(shared("dicom").glob("*.dcm")):
        data = path.read_bytes()
        try:
            ds = I.read_dicom_header(data)
        except I.ImageError:
            continue  # the refusal cases
        ours = I._native_pixels(ds, int(ds.Rows), int(ds.Columns))
        if ours is None:
            continue
        np.testing.assert_array_equal(ours, pydicom.dcmread(path).pixel_array)
        checked += 1
    assert checked >= 2


def test_box_average_split_over_threads_is_identical(monkeypatch):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 1 << 15, size=(1203, 1001)).astype(np.uint16)
    monkeypatch.delenv("OPJ_NUM_THREADS", raising=False)
    monkeypatch.setattr(I, "_SPLIT_PIXELS", 1000)  # split whatever the default
    one = I._box_reduce(a, 4)  # unsplit
    parts = []
    real = I._box_reduce
    monkeypatch.setattr(I, "_box_reduce", lambda p, f: parts.append(p.shape) or real(p, f))
    monkeypatch.setattr(I, "_decode_threads", 3)
    three = I.box_reduce(a, 4)
    assert len(parts) == 3 and sum(rows for rows, _ in parts) == 1203  # the split path ran
    assert all(rows % 4 == 0 for rows, _ in parts[:-1])  # whole block rows but the last
    np.testing.assert_array_equal(one, three)
    np.testing.assert_array_equal(I.box_reduce(a, 7), real(a, 7))
    assert one.shape == (301, 251)


def test_decode_threads_set_openjpeg_threads_unless_the_operator_did(monkeypatch):
    monkeypatch.delenv("OPJ_NUM_THREADS", raising=False)
    monkeypatch.delenv(I._OPJ_MARK, raising=False)
    monkeypatch.setattr(I, "_decode_threads", 1)
    I.set_decode_threads(2)
    assert os.environ["OPJ_NUM_THREADS"] == "2"
    I.set_decode_threads(1)  # one thread: no OpenJPEG pool at all
    assert "OPJ_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OPJ_NUM_THREADS", "4")  # the operator's
    I.set_decode_threads(2)
    assert os.environ["OPJ_NUM_THREADS"] == "4"
