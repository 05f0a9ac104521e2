"""The synthetic CXR generator: deterministic, independent findings, masks, PNG and DICOM."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diagnostics import imaging as I
from diagnostics.data.config import parse_dataset_config
from diagnostics.data.cxr import load_dataset
from diagnostics.data.synthetic import (
    SYNTH_FINDINGS,
    SynthSpec,
    _anatomy,
    digest,
    draw,
    generate,
    write_dataset,
)


def test_deterministic_by_seed(tmp_path):
    a = write_dataset(tmp_path / "a", 6, size=48, seed=5)
    b = write_dataset(tmp_path / "b", 6, size=48, seed=5)
    c = write_dataset(tmp_path / "c", 6, size=48, seed=6)
    assert digest(a) == digest(b) != digest(c)
    for name in pd.read_csv(a)["path"]:
        assert digest(tmp_path / "a" / name) == digest(tmp_path / "b" / name)


def test_image_i_does_not_depend_on_n():
    spec = SynthSpec(size=48)
    few = generate(3, spec, seed=2)
    many = generate(9, spec, seed=2)
    for (_, x, _), (_, y, _) in zip(few, many[:3], strict=True):
        assert np.array_equal(x.pixels, y.pixels)


def test_findings_are_independent_and_near_their_prevalence():
    images = generate(600, SynthSpec(size=32), seed=0)
    labels = np.array([[im.labels[f] for f in SYNTH_FINDINGS] for _, im, _ in images])
    prevalence = labels.mean(axis=0)
    assert np.all(np.abs(prevalence - 0.3) < 0.06)
    corr = np.corrcoef(labels.T)
    assert np.abs(corr[np.triu_indices(len(SYNTH_FINDINGS), 1)]).max() < 0.12


@pytest.mark.parametrize("finding", SYNTH_FINDINGS)
def test_each_finding_changes_pixels_inside_its_mask(finding):
    spec = SynthSpec(size=128, difficulty=0.0)
    rng_anat = np.random.default_rng(0)
    anatomy = _anatomy(rng_anat)
    none = dict.fromkeys(SYNTH_FINDINGS, 0)
    base = draw(np.random.default_rng(1), spec, none, anatomy)
    sick = draw(np.random.default_rng(1), spec, none | {finding: 1}, anatomy)
    mask = sick.masks[finding]
    assert mask.any() and not base.masks
    inside = np.abs(sick.pixels - base.pixels)[mask].mean()
    outside = np.abs(sick.pixels - base.pixels)[~mask].mean()
    assert inside > 0.04 and inside > 4 * outside, (inside, outside)


def test_difficulty_lowers_contrast():
    anatomy = _anatomy(np.random.default_rng(0))
    none = dict.fromkeys(SYNTH_FINDINGS, 0)

    def contrast(d: float) -> float:
        spec = SynthSpec(size=96, difficulty=d)
        base = draw(np.random.default_rng(3), spec, none, anatomy)
        sick = draw(np.random.default_rng(3), spec, none | {"Nodule": 1}, anatomy)
        return float((sick.pixels - base.pixels)[sick.masks["Nodule"]].mean())

    assert contrast(0.0) > contrast(1.0) > 0


def test_png_dataset_with_masks_reads_through_the_manifest_adapter(synth_png):
    table = load_dataset(
        parse_dataset_config({"source": "manifest", "labels_file": str(synth_png)})
    )
    assert table.findings == list(SYNTH_FINDINGS)
    assert len(table.frame) == 40 and table.images_verified
    assert table.frame["patient_id"].nunique() < 40  # some patients have several images
    row = table.frame[table.frame["Nodule"] == 1].iloc[0]
    mask = np.asarray(Image.open(synth_png.parent / row["mask_Nodule"])) > 0
    assert mask.any()
    img = I.decode(row["path"])
    assert img.shape == mask.shape == (64, 64)


@pytest.mark.parametrize("bits", [12, 16])
def test_dicom_monochrome1_and_2_decode_to_the_same_image(tmp_path, bits):
    m1 = write_dataset(
        tmp_path / "m1", 3, size=64, seed=1, fmt="dicom", bits=bits, photometric="MONOCHROME1"
    )
    m2 = write_dataset(
        tmp_path / "m2", 3, size=64, seed=1, fmt="dicom", bits=bits, photometric="MONOCHROME2"
    )
    png = write_dataset(tmp_path / "png", 3, size=64, seed=1)
    for rel in pd.read_csv(m1)["path"]:
        a = I.decode(m1.parent / rel)
        b = I.decode(m2.parent / rel)
        assert a.photometric == "MONOCHROME1" and b.photometric == "MONOCHROME2"
        assert a.bits_stored == bits and a.dicom["Modality"] == "CR"
        np.testing.assert_allclose(a.pixels, b.pixels, atol=1e-6)
        p = I.decode(png.parent / rel.replace(".dcm", ".png")).pixels
        # both quantise the same drawing: 8-bit PNG and 12/16-bit DICOM, half a step each
        np.testing.assert_allclose(a.pixels, p, atol=0.5 / 255 + 0.5 / (2**bits - 1) + 1e-6)


def test_spec_validation():
    with pytest.raises(ValueError):
        SynthSpec(size=8)
    with pytest.raises(ValueError):
        SynthSpec(difficulty=2)
    with pytest.raises(ValueError):
        SynthSpec(prevalence={"Gout": 0.5})


def test_rewriting_a_folder_replaces_the_previous_dataset(tmp_path):
    write_dataset(tmp_path, 6, size=40, seed=1)
    (tmp_path / "notes.txt").write_text("mine")
    write_dataset(tmp_path, 2, size=40, seed=1)
    assert len(list((tmp_path / "images").iterdir())) == 2
    assert len(pd.read_csv(tmp_path / "manifest.csv")) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"  # files it did not write are kept
