"""Decoding at the model's resolution (`decode(..., target=N)`) against the full-resolution path.

Tolerance, measured on every real DICOM in ../shared/data/dicom (and the real chest re-encoded
as DICOM JPEG baseline) and on all 60 NIH PNGs, for input sides 224 and 64 and every crop
policy: the model input in [0, 1] units (`resize_square`'s output, which is the tensor itself
for `normalize="unit"`) differs by at most 0.039 at 224 px and 0.055 at 64 px (sharp burned-in
markers and collimator edges, where a box average followed by the bilinear filter is not the
bilinear filter alone), and on average by at most 0.0016 at 224 px and 0.0029 at 64 px. The
bounds here: MAX_ABS = 0.07 and MEAN_ABS = 0.004 in those units; in normalised units they are
divided by the normalisation's std (x4 for a fixed std of 0.25, x4.4 for ImageNet's). Model
probabilities (the exported session model at 64 px, and a random ResNet-18 at 224 px) move by
at most 1e-3 (measured: under 1e-4).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from diagnostics import imaging as I
from diagnostics.contract import PreprocessSpec
from diagnostics.serve import qc
from tests.conftest import SHARED_DATA, shared

MAX_ABS = 0.07  # [0, 1] units, per element of the model input
MEAN_ABS = 0.004
PROB_TOL = 1e-3

SPECS = [
    PreprocessSpec(size=224),
    PreprocessSpec(size=224, crop="center"),
    PreprocessSpec(size=224, crop="squash"),
    PreprocessSpec(size=64),
    PreprocessSpec(size=224, channels=3, normalize="imagenet"),
]


def _dicoms() -> list[Path]:
    folder = SHARED_DATA / "dicom"
    return sorted(folder.glob("*.dcm")) if folder.is_dir() else []


def _pngs() -> list[Path]:
    nih = sorted((SHARED_DATA / "cxr" / "nih_sample" / "images").glob("*.png"))[::10]
    adult = sorted((SHARED_DATA / "cxr" / "adult_reference").rglob("*.png"))[:2]
    return nih + adult


def _inputs(image: I.DecodedImage, spec: PreprocessSpec) -> np.ndarray:
    return I.resize_square(image.pixels, spec, geometry=image.geometry)


def _compare(full: I.DecodedImage, reduced: I.DecodedImage, spec: PreprocessSpec) -> None:
    a, b = _inputs(full, spec), _inputs(reduced, spec)
    assert a.shape == b.shape == (spec.size, spec.size)
    diff = np.abs(a - b)
    assert diff.max() <= MAX_ABS, f"max {diff.max():.4f}"
    assert diff.mean() <= MEAN_ABS, f"mean {diff.mean():.5f}"
    # the exact tensor the model sees, in normalised units
    x, y = (
        I.preprocess(full.pixels, spec),
        I.preprocess(reduced.pixels, spec, geometry=reduced.geometry),
    )
    std = 0.25 if spec.normalize == "fixed" else (0.224 if spec.normalize == "imagenet" else 1.0)
    assert np.abs(x - y).max() <= MAX_ABS / std


# --------------------------------------------------------------------------- no data needed


def test_reduction_factor_keeps_twice_the_target():
    assert I.reduction_factor(1955, 1841, None) == 1
    assert I.reduction_factor(1955, 1841, 224) == 4  # 1841 / 4 = 460 >= 448
    assert I.reduction_factor(1024, 1024, 224) == 2
    assert I.reduction_factor(1955, 1841, 64, power_of_two=True) == 8
    assert I.reduction_factor(300, 300, 224) == 1  # never upscale, never below 2x
    for rows, cols, target in [(1955, 1841, 224), (4000, 3000, 512), (700, 2000, 128)]:
        f = I.reduction_factor(rows, cols, target)
        assert min(rows, cols) / f >= I.REDUCE_MARGIN * target


def test_box_reduce_is_the_exact_block_mean_and_deterministic():
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2**15, size=(43, 37), dtype=np.uint16)
    out = I.box_reduce(stored, 4)
    assert out.shape == (11, 10) and out.dtype == np.float32
    assert out[0, 0] == pytest.approx(stored[:4, :4].mean(), rel=1e-6)
    assert out[-1, -1] == pytest.approx(stored[40:, 36:].mean(), rel=1e-6)  # partial block
    assert out[-1, 3] == pytest.approx(stored[40:, 12:16].mean(), rel=1e-6)
    assert np.array_equal(out, I.box_reduce(stored.copy(), 4))
    assert np.array_equal(I.box_reduce(stored, 1), stored.astype(np.float32))


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _phantom(size: int = 1024) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 0.2 + 0.5 * np.exp(-((x - 0.35) ** 2 + (y - 0.5) ** 2) / 0.03)
    img += 0.5 * np.exp(-((x - 0.65) ** 2 + (y - 0.5) ** 2) / 0.03)
    img[100:140, 80:300] = 0.95  # a sharp marker
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def test_target_none_is_the_full_resolution_path():
    data = _png_bytes(_phantom(300))
    a, b = I.decode(data), I.decode(data, target=None)
    assert a.geometry is None and b.geometry is None
    assert np.array_equal(a.pixels, b.pixels) and a.shape == (300, 300)
    small = I.decode(data, target=224)  # 300 < 2 x 224: nothing to reduce, exact
    assert small.geometry is None and np.array_equal(small.pixels, a.pixels)


def test_png_and_jpeg_reduced_match_the_full_path():
    from PIL import Image

    phantom = _phantom()
    png = _png_bytes(phantom)
    buf = io.BytesIO()
    Image.fromarray(phantom).convert("RGB").save(buf, format="JPEG", quality=95)
    jpeg = buf.getvalue()
    for data, scale in ((png, 4.0), (jpeg, 4.0)):
        full, reduced = I.decode(data), I.decode(data, target=128)
        assert reduced.geometry is not None and reduced.geometry.scale == (scale, scale)
        assert reduced.shape == full.shape == (1024, 1024)
        assert reduced.pixels.shape == (256, 256)
        for spec in (PreprocessSpec(size=128), PreprocessSpec(size=128, crop="center")):
            _compare(full, reduced, spec)


def test_a_rotated_jpeg_is_decoded_in_full_then_averaged():
    """DCT scaling would put a partial block first after the EXIF transpose (shifting the
    image): a JPEG with a rotation tag is decoded in full, rotated, then box-averaged."""
    from PIL import Image

    phantom = _phantom()[:, :800]  # 1024 rows x 800 cols
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    Image.fromarray(phantom).save(buf, format="JPEG", quality=95, exif=exif)
    full, reduced = I.decode(buf.getvalue()), I.decode(buf.getvalue(), target=128)
    assert full.shape == reduced.shape == (800, 1024)
    assert reduced.geometry is not None and reduced.geometry.scale == (3.0, 3.0)  # box, not DCT
    _compare(full, reduced, PreprocessSpec(size=128))


# --------------------------------------------------------------------------- real data


@pytest.mark.parametrize("path", _dicoms(), ids=lambda p: p.name)
def test_real_dicom_reduced_matches_full(path):
    data = shared("dicom", path.name).read_bytes()
    try:
        full = I.decode(data)
    except I.ImageError as exc:  # a file that is refused is refused the same way
        with pytest.raises(I.ImageError) as again:
            I.decode(data, target=224)
        assert again.value.code == exc.code
        return
    for spec in SPECS:
        reduced = I.decode(data, target=spec.size)
        assert reduced.shape == full.shape
        assert reduced.dicom == full.dicom and reduced.photometric == full.photometric
        assert (reduced.age_years, reduced.age_source) == (full.age_years, full.age_source)
        assert reduced.bits_stored == full.bits_stored
        if min(full.shape) >= 2 * I.REDUCE_MARGIN * spec.size:
            assert reduced.geometry is not None
        if reduced.geometry is None:  # too small to reduce: exactly the full path
            assert np.array_equal(reduced.pixels, full.pixels)
        _compare(full, reduced, spec)


def test_real_jpeg2000_is_decoded_at_a_reduced_level():
    data = shared("dicom", "pydicom-data_RG1_J2KR.dcm").read_bytes()
    reduced = I.decode(data, target=224)
    assert reduced.geometry is not None
    assert reduced.geometry.scale == (4.0, 4.0) and reduced.geometry.offset == (-1.5, -1.5)
    assert reduced.pixels.shape == (489, 461)  # OpenJPEG's level size, ceil(1955 / 4)


def test_real_lossless_forms_reduce_to_the_same_pixels():
    uncr = I.decode(shared("dicom", "pydicom-data_RG1_UNCR.dcm"), target=224)
    jlsn = I.decode(shared("dicom", "WG04_RG1_JLSN.dcm"), target=224)
    again = I.decode(shared("dicom", "pydicom-data_RG1_UNCR.dcm"), target=224)
    assert np.array_equal(uncr.pixels, again.pixels)  # deterministic
    assert uncr.geometry == jlsn.geometry
    assert np.abs(uncr.pixels - jlsn.pixels).max() < 0.01  # JPEG-LS near-lossless


@pytest.mark.parametrize("index", range(8))
def test_real_png_reduced_matches_full(index):
    shared("cxr")
    paths = _pngs()
    if index >= len(paths):
        pytest.skip("fewer real PNGs here")
    data = paths[index].read_bytes()
    full = I.decode(data)
    for spec in SPECS:
        _compare(full, I.decode(data, target=spec.size), spec)


def test_real_qc_decisions_unchanged():
    shared("dicom")
    cfg = qc.QCConfig()
    for path in [*_dicoms(), *_pngs()]:
        data = path.read_bytes()
        try:
            full = I.decode(data)
        except I.ImageError:
            continue
        reduced = I.decode(data, target=224)
        a = [(r.code, r.passed) for r in qc.check_image(full, cfg)]
        b = [(r.code, r.passed) for r in qc.check_image(reduced, cfg)]
        assert a == b, path.name


def test_real_qc_contrast_on_a_subsample_is_within_0_02_of_all_pixels():
    """QC's 1st-99th percentile range is taken on a regular subsample of about 62,500 pixels
    (`qc.check_image`): on the real chests, reduced and full, it stays within 0.02 of the range
    over every pixel (measured: 0.013), so only an image that close to `min_dynamic_range`
    could change verdict.
    """
    shared("dicom")
    worst = 0.0
    for path in [*_dicoms(), *_pngs()]:
        data = path.read_bytes()
        for target in (None, 224):
            try:
                px = I.decode(data, target=target).pixels
            except I.ImageError:
                break
            step = max(1, int(np.ceil(np.sqrt(px.size / 62_500))))
            every = np.subtract(*np.percentile(px, [99, 1]))
            sample = np.subtract(*np.percentile(px[::step, ::step], [99, 1]))
            worst = max(worst, abs(every - sample))
    assert worst <= 0.02, worst


def _probabilities(model, images: list[I.DecodedImage]) -> np.ndarray:
    spec = model.metadata.preprocessing
    x = np.stack([I.preprocess(im.pixels, spec, geometry=im.geometry) for im in images])
    return model.predict(x).probabilities


def _real_inputs() -> list[bytes]:
    out = []
    for path in [*_dicoms(), *_pngs()]:
        data = path.read_bytes()
        try:
            I.decode(data)
        except I.ImageError:
            continue
        out.append(data)
    return out


def test_real_model_probabilities_unchanged(cxr_model):
    from diagnostics.serve.runner import OnnxModel, Scorer

    shared("dicom")
    model = OnnxModel(cxr_model, device="cpu")
    size = model.metadata.preprocessing.size
    inputs = _real_inputs()
    full = _probabilities(model, [I.decode(d) for d in inputs])
    reduced = _probabilities(model, [I.decode(d, target=size) for d in inputs])
    assert np.abs(full - reduced).max() <= PROB_TOL
    # the Scorer's own path decodes at the model's size
    scorer = Scorer(model)
    for k, data in enumerate(inputs):
        res = scorer.score(data)
        assert (
            res.image is not None and (res.image["rows"], res.image["cols"]) == I.decode(data).shape
        )
        for finding in res.findings:
            j = model.metadata.labels.index(finding.label)
            assert abs(finding.probability - full[k, j]) <= PROB_TOL


def test_real_probabilities_of_a_224_model(tmp_path):
    pytest.importorskip("torch")
    from diagnostics.serve.runner import OnnxModel
    from diagnostics.train.export import random_export

    shared("dicom")
    path = random_export("resnet18", 224, ["Pneumonia"], tmp_path / "m.onnx", name="reduced-224")
    model = OnnxModel(path, device="cpu")
    inputs = _real_inputs()
    full = _probabilities(model, [I.decode(d) for d in inputs])
    reduced = _probabilities(model, [I.decode(d, target=224) for d in inputs])
    assert np.abs(full - reduced).max() <= PROB_TOL


def test_real_chest_as_dicom_jpeg_baseline_uses_dct_scaling():
    import pydicom
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = pydicom.dcmread(shared("dicom", "pydicom-data_RG1_UNCR.dcm"))
    buf = io.BytesIO()
    Image.fromarray((ds.pixel_array >> 7).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    full = I.decode(data)
    for spec, scale in ((PreprocessSpec(size=224), 4.0), (PreprocessSpec(size=64), 8.0)):
        reduced = I.decode(data, target=spec.size)
        assert reduced.geometry is not None and reduced.geometry.scale == (scale, scale)
        assert reduced.photometric == "MONOCHROME1" and reduced.shape == full.shape
        _compare(full, reduced, spec)
