"""The one preprocessing: decoded grey image -> model input, driven by PreprocessSpec."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from diagnostics.contract import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from diagnostics.imaging import preprocess, square


def _ramp(h: int = 300, w: int = 200) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return (x / (w - 1) * 0.5 + y / (h - 1) * 0.5).astype(np.float32)


def test_shape_dtype_and_determinism():
    spec = PreprocessSpec(size=64, channels=3, crop="center", normalize="imagenet")
    a = preprocess(_ramp(), spec)
    b = preprocess(_ramp(), spec)
    assert a.shape == (3, 64, 64) and a.dtype == np.float32 and a.flags.c_contiguous
    assert np.array_equal(a, b)


def test_golden_values():
    # Golden numbers for the default spec on a fixed ramp. A change here changes every model's
    # input: bump PREPROCESS_VERSION with it.
    out = preprocess(_ramp(), PreprocessSpec(size=32))
    assert out.shape == (1, 32, 32)
    assert float(out.mean()) == pytest.approx(GOLDEN_MEAN, abs=1e-6)
    assert float(out[0, 16, 16]) == pytest.approx(GOLDEN_CENTRE, abs=1e-6)
    assert float(out[0, 16, 0]) == 0.0  # letterbox pad is air (0)


def test_letterbox_keeps_aspect_and_pads_with_zero():
    img = np.ones((100, 50), np.float32)
    sq = square(img, "letterbox")
    assert sq.shape == (100, 100)
    assert sq[:, :25].max() == 0 and sq[:, 25:75].min() == 1 and sq[:, 75:].max() == 0


def test_center_crop_takes_the_middle():
    img = np.zeros((100, 50), np.float32)
    img[25:75] = 1
    assert square(img, "center").min() == 1 and square(img, "center").shape == (50, 50)


def test_squash_keeps_all_content():
    out = preprocess(np.ones((100, 50), np.float32), PreprocessSpec(size=20, crop="squash"))
    assert out.min() == pytest.approx(1.0)


def test_resize_is_antialiased():
    # A one-pixel checkerboard averages to mid-grey when shrunk; nearest-neighbour would alias.
    board = (np.indices((256, 256)).sum(axis=0) % 2).astype(np.float32)
    out = preprocess(board, PreprocessSpec(size=32))
    assert np.abs(out - 0.5).max() < 0.05


def test_normalisations():
    img = np.full((10, 10), 0.5, np.float32)
    unit = preprocess(img, PreprocessSpec(size=10))
    assert np.allclose(unit, 0.5)
    imnet = preprocess(img, PreprocessSpec(size=10, channels=3, normalize="imagenet"))
    for c in range(3):
        assert np.allclose(imnet[c], (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=1e-6)
    fixed = preprocess(img, PreprocessSpec(size=10, normalize="fixed", mean=(0.25,), std=(0.5,)))
    assert np.allclose(fixed, 0.5)


def test_one_and_three_channels_carry_the_same_image():
    one = preprocess(_ramp(), PreprocessSpec(size=16, channels=1))
    three = preprocess(_ramp(), PreprocessSpec(size=16, channels=3))
    assert np.array_equal(three[0], one[0]) and np.array_equal(three[2], one[0])


def test_bad_inputs_and_specs_are_refused():
    with pytest.raises(ValueError, match="grey"):
        preprocess(np.zeros((4, 4, 3), np.float32), PreprocessSpec(size=8))
    bad = np.zeros((8, 8), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        preprocess(bad, PreprocessSpec(size=8))
    with pytest.raises(ValidationError):
        PreprocessSpec(channels=1, normalize="imagenet")
    with pytest.raises(ValidationError):
        PreprocessSpec(normalize="fixed", mean=(0.1, 0.2), std=(1.0,), channels=1)
    with pytest.raises(ValidationError):
        PreprocessSpec(size=64, unknown=1)


def test_spec_round_trips_as_json():
    spec = PreprocessSpec(size=96, channels=3, crop="center", normalize="imagenet")
    assert PreprocessSpec.model_validate_json(spec.model_dump_json()) == spec


GOLDEN_MEAN = 0.33332708
GOLDEN_CENTRE = 0.51963466
