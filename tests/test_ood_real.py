"""Input QC of a model trained on real paediatric chest X-rays, on real inputs.

The session fixture trains `configs/cxr/kermany.yaml`, shrunk to run in about a minute on two
cores (fewer images, 64 px, fewer epochs), with its population check trained against the
shared adult chests. It runs on every CI run; without ../shared it skips with the reason.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from conftest import REPO, diagnostics_home, shared
from service_support import colour_photo, dicom_bytes, png_bytes

from diagnostics.serve.qc import OOD, OUTSIDE_POPULATION, QCConfig
from diagnostics.serve.runner import OnnxModel, Scorer

MODEL_REFUSALS = (OOD, OUTSIDE_POPULATION)  # the model's own judgements


@pytest.fixture(scope="session")
def real_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from diagnostics.train.config import load_train_config
    from diagnostics.train.cxr import train_cxr

    kermany = shared("cxr", "kermany224")
    adults = shared("cxr", "adult_reference", "labels.csv")
    root = tmp_path_factory.mktemp("kermany_small")
    cfg = load_train_config(
        REPO / "configs" / "cxr" / "kermany.yaml",
        [
            f"data.root={kermany}",
            "data.max_images=1600",
            "preprocess.size=64",
            "model.options.width=16",
            "train.epochs=8",
            "train.threads=2",
            "eval.bootstrap=0",
            "eval.int8=false",
            "eval.parity_images=4",
            f"population.check.outside.labels_file={adults}",
            "tracking.registered_model=null",
        ],
    )
    with diagnostics_home(root / "home"):
        result = train_cxr(cfg, progress=False)
    # Kermany images the model never saw (max_images left them out): new children
    frame = pd.read_csv(kermany / "labels.csv")
    used = {Path(p).name for p in result_paths(result)}
    unseen = [kermany / p for p in frame["path"] if Path(p).name not in used]
    return {"result": result, "unseen_children": unseen}


def result_paths(result) -> list[str]:
    import yaml

    from diagnostics.data.config import parse_dataset_config
    from diagnostics.data.cxr import load_dataset

    cfg = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    return load_dataset(parse_dataset_config(cfg["data"])).frame["path"].tolist()


@pytest.fixture(scope="session")
def scorer(real_model) -> Scorer:
    # Tag and colour checks widened: what is tested here is the model's own judgement.
    qc = QCConfig(body_parts=["CHEST", "EXTREMITY"], max_chroma=1.0)
    return Scorer(OnnxModel(real_model["result"].onnx_path), qc)


def _without_age(path: Path) -> bytes:
    """A real DICOM file with its age and birth date removed: the model must judge it."""
    ds = pydicom.dcmread(path)
    for tag in ("PatientAge", "PatientBirthDate"):
        if tag in ds:
            delattr(ds, tag)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_the_check_was_measured_at_training(real_model):
    check = real_model["result"].metadata.population.check
    m = check.metrics
    assert m["auroc"] > 0.95, m
    assert m["outside_refused"] >= 0.9 and m["inside_val_refused"] <= 0.02, m


def test_non_chest_radiograph_and_photo_are_refused_by_the_model(scorer):
    rle = scorer.score(_without_age(shared("dicom", "WG04_RG3_RLE.dcm")))
    assert rle.code in MODEL_REFUSALS, (rle.ood_score, rle.population)
    photo = scorer.score(colour_photo())
    assert photo.code in MODEL_REFUSALS, (photo.ood_score, photo.population)


def test_adult_chests_are_refused(real_model, scorer):
    nih = pd.read_csv(shared("cxr", "nih_sample", "labels.csv"))
    adults = [shared("cxr", "nih_sample", "images", f) for f in nih[nih["age"] >= 18]["filename"]]
    # Real adult chest PNGs, no age known: the population check alone (OOD off) refuses them.
    check_only = Scorer(OnnxModel(real_model["result"].onnx_path), QCConfig(ood=False))
    results = [check_only.score(p.read_bytes()) for p in adults]
    by_check = [r for r in results if r.code == OUTSIDE_POPULATION]
    assert all(r.population["evidence"] == "check" for r in by_check)
    assert len(by_check) >= 0.9 * len(adults), [r.population.get("check_score") for r in results]
    # With the clinic's whole QC, refused by the OOD distance or the population check.
    refused = sum(scorer.score(p.read_bytes()).code in MODEL_REFUSALS for p in adults)
    assert refused >= len(by_check)
    # The real adult DICOM chest: refused by its age (64 years, from its dates), before the
    # model runs; without the dates, by the model's own check.
    dcm = shared("dicom", "pydicom-data_RG1_UNCR.dcm")
    by_age = scorer.score(dcm.read_bytes())
    assert by_age.code == OUTSIDE_POPULATION and by_age.population["evidence"] == "age"
    assert scorer.score(_without_age(dcm)).code in MODEL_REFUSALS


def test_new_children_pass(real_model, scorer):
    children = real_model["unseen_children"][::12][:120]
    results = [scorer.score(p.read_bytes()) for p in children]
    refused = [r for r in results if r.status != "scored"]
    assert len(refused) <= 0.05 * len(children), [(r.code, r.population) for r in refused]


def test_dicom_age_decides_on_a_real_child(real_model, scorer):
    from diagnostics.imaging import decode

    pixels = decode(real_model["unseen_children"][0]).pixels
    child = scorer.score(dicom_bytes(pixels, PatientAge="003Y"))
    assert child.status == "scored" and child.population["evidence"] == "age"
    adult = scorer.score(dicom_bytes(pixels, PatientAge="045Y"))
    assert adult.code == OUTSIDE_POPULATION and adult.population["evidence"] == "age"
    assert "timing_ms" in adult.as_dict() and "model" not in adult.timing_ms  # never scored
    # and a PNG of the same child, no age known: the check lets it through
    assert scorer.score(png_bytes(pixels)).status == "scored"


def test_evaluate_on_adults_reports_refusals_not_an_auroc_over_them(real_model):
    """The adult NIH images through `evaluate`: withheld and counted, by reason."""
    from diagnostics.data.config import parse_dataset_config
    from diagnostics.train.evaluate import evaluate

    data = parse_dataset_config(
        {
            "source": "nih14",
            "root": str(shared("cxr", "nih_sample")),
            "labels_file": str(shared("labels", "nih_chestxray14_Data_Entry_2017_v2020.csv.gz")),
            "missing_images": "drop",
            "findings": ["Pneumonia"],
            "split": {"fractions": {"all": 1.0}},
        }
    )
    report = evaluate(real_model["result"].onnx_path, data, split="all", n_boot=0, progress=False)
    qc = report["qc"]
    assert qc["images"] == 60 and qc["withheld"] >= 0.85 * 60, qc
    assert report["findings"]["Pneumonia"]["n"] == qc["scored_with_a_call"]
