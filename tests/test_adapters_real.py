"""Dataset adapters on the real official label files and images in ../shared/data."""

from __future__ import annotations

import gzip
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from diagnostics.data import labels as L
from diagnostics.data.config import parse_dataset_config
from diagnostics.data.cxr import load_dataset
from diagnostics.data.splits import patient_overlap
from diagnostics.imaging import decode
from tests.conftest import shared


def _load(**cfg):
    return load_dataset(parse_dataset_config(cfg))


@pytest.fixture(scope="module")
def nih():
    path = shared("labels", "nih_chestxray14_Data_Entry_2017_v2020.csv.gz")
    return path, _load(source="nih14", labels_file=str(path), verify_images=False)


def test_nih_counts(nih):
    _, table = nih
    assert len(table.frame) == 112_120
    assert table.frame["patient_id"].nunique() == 30_805
    assert not table.images_verified


def test_nih_prevalence_matches_the_file(nih):
    path, table = nih
    # Count the pipe-separated tokens straight from the text, independently of the adapter.
    counts: Counter[str] = Counter()
    with gzip.open(path, "rt") as fh:
        next(fh)
        for line in fh:
            counts.update(line.split(",")[1].split("|"))
    for src, dst in L.NIH14_MAP.items():
        assert int(table.frame[dst].sum()) == counts[src], src
    assert table.frame[list(L.NIH14)].isna().sum().sum() == 0  # NIH annotates all 14
    assert table.frame["Lung_Lesion"].isna().all() if "Lung_Lesion" in table.frame else True


def test_nih_splits_never_share_a_patient(nih):
    _, table = nih
    assert patient_overlap(table.frame) == {}
    assert set(table.frame["split"]) == {"train", "val", "test"}


def test_nih_unannotated_finding_is_nan_not_zero():
    path = shared("labels", "nih_chestxray14_Data_Entry_2017_v2020.csv.gz")
    table = _load(
        source="nih14",
        labels_file=str(path),
        verify_images=False,
        findings=["Pneumonia", "Fracture"],
        max_images=1000,
    )
    assert table.findings == ["Pneumonia", "Fracture"]
    assert table.frame["Fracture"].isna().all()
    assert any("Fracture is not annotated" in n for n in table.notes)


def test_nih_sample_images_with_official_labels():
    table = _load(
        source="nih14",
        root=str(shared("cxr", "nih_sample")),
        labels_file=str(shared("labels", "nih_chestxray14_Data_Entry_2017_v2020.csv.gz")),
        missing_images="drop",
    )
    assert len(table.frame) == 60 and table.images_verified
    assert any("112,060 labelled images not on disk" in n for n in table.notes)
    sample = pd.read_csv(shared("cxr", "nih_sample", "labels.csv")).set_index("filename")
    frame = table.frame.set_index("image_id")
    assert (frame["Pneumonia"] == sample.loc[frame.index, "label_pneumonia"]).all()
    assert (frame["view"] == sample.loc[frame.index, "view"]).all()
    assert patient_overlap(table.frame) == {}
    for path in table.frame["path"].iloc[:3]:  # the listed files really are the images
        assert decode(path).shape == (1024, 1024)


def test_nih_missing_images_are_an_error_by_default():
    from diagnostics.data.cxr import DatasetError

    with pytest.raises(DatasetError, match="not on disk"):
        _load(
            source="nih14",
            root=str(shared("cxr", "nih_sample")),
            labels_file=str(shared("labels", "nih_chestxray14_Data_Entry_2017_v2020.csv.gz")),
        )


@pytest.fixture(scope="module")
def chexpert_raw():
    path = shared("labels", "chexpert_train.csv.gz")
    return path, pd.read_csv(path)


def test_chexpert_uncertain_policy_changes_exactly_the_minus_one_cells(chexpert_raw):
    path, raw = chexpert_raw
    tables = {
        p: _load(
            source="chexpert", labels_file=str(path), verify_images=False, uncertain=p, blank="nan"
        )
        for p in ("ignore", "zeros", "ones")
    }
    for src, dst in L.CHEXPERT_MAP.items():
        col = raw[src].to_numpy(dtype=np.float64)
        minus = col == -1
        got = {p: t.frame[dst].to_numpy(dtype=np.float64) for p, t in tables.items()}
        assert np.isnan(got["ignore"][minus]).all()
        assert (got["zeros"][minus] == 0).all() and (got["ones"][minus] == 1).all()
        for p in got:  # every other cell is the raw value (blank stays NaN)
            np.testing.assert_array_equal(got[p][~minus], col[~minus])
    assert int((raw[list(L.CHEXPERT_MAP)] == -1).to_numpy().sum()) > 0


def test_chexpert_patients_views_and_frontal_filter(chexpert_raw):
    path, raw = chexpert_raw
    table = _load(source="chexpert", labels_file=str(path), verify_images=False, views=["PA", "AP"])
    # 17 "Frontal" rows say LL or RL in AP/PA: contradictory, so the view filter drops them.
    frontal = (raw["Frontal/Lateral"] == "Frontal") & raw["AP/PA"].isin(["AP", "PA"])
    assert int(((raw["Frontal/Lateral"] == "Frontal") & ~frontal).sum()) == 17
    assert len(table.frame) == int(frontal.sum())
    assert table.frame["view"].isin(["PA", "AP"]).all()
    expected_patients = (
        raw.loc[frontal, "Path"].str.extract(r"(patient\d+)", expand=False).nunique()
    )
    assert table.frame["patient_id"].nunique() == expected_patients
    assert patient_overlap(table.frame) == {}


def test_chexpert_blank_policy():
    path = shared("labels", "chexpert_train.csv.gz")
    table = _load(
        source="chexpert",
        labels_file=str(path),
        verify_images=False,
        uncertain="zeros",
        max_images=500,
    )  # blank: zeros is the default
    assert not table.frame[table.findings].isna().any().any()
    assert 0 < table.frame["No_Finding"].mean() < 0.5
    # With blank: nan, CheXpert's No Finding has no negatives at all: the check warns.
    from diagnostics.data.check import summarize

    nan = _load(
        source="chexpert", labels_file=str(path), verify_images=False, blank="nan", max_images=2000
    )
    notes = summarize(nan)["notes"]
    assert any(n.startswith("No_Finding: no negative") for n in notes), notes


def test_vindr_reader_aggregation_gives_per_image_labels():
    path = shared("labels", "vindr_cxr_train.csv.gz")
    raw = pd.read_csv(path)
    major = _load(source="vindr_cxr", labels_file=str(path), verify_images=False)
    anyr = _load(
        source="vindr_cxr", labels_file=str(path), verify_images=False, reader_aggregation="any"
    )
    n_images = raw["image_id"].nunique()
    assert len(major.frame) == len(anyr.frame) == n_images
    assert major.frame["image_id"].is_unique
    m = major.frame.set_index("image_id")
    a = anyr.frame.set_index("image_id").loc[m.index]
    findings = [f for f in major.findings if f != "No_Finding"]
    assert (a[findings] >= m[findings]).all().all()  # "any" is never stricter than "majority"
    assert (a[findings].sum() > m[findings].sum()).any()
    # Recount one finding by hand: images where more than half of the readers boxed it.
    readers = raw.groupby("image_id")["rad_id"].nunique()
    boxed = raw[raw["class_name"] == "Cardiomegaly"].groupby("image_id")["rad_id"].nunique()
    expected = (boxed.reindex(readers.index, fill_value=0) * 2 > readers).sum()
    assert int(m["Cardiomegaly"].sum()) == int(expected)
    # No_Finding comes from the readers' own verdicts: with "any", it is 1 exactly for images
    # every reader called normal; with "majority", never alongside a positive finding.
    all_normal = raw.groupby("image_id")["class_name"].agg(lambda s: (s == "No finding").all())
    assert int(a["No_Finding"].sum()) == int(all_normal.sum())
    assert ((m["No_Finding"] == 1) & (m[findings].sum(axis=1) > 0)).sum() == 0
    # Images whose three readers each saw something different are not called normal.
    disagree = (m["No_Finding"] == 0) & (m[findings].sum(axis=1) == 0)
    assert disagree.sum() > 0 and not all_normal.loc[disagree[disagree].index].any()
    # Findings VinDr's train.csv does not annotate stay unknown.
    assert "Edema" not in major.findings


def test_rsna_boxes_become_one_label_per_image():
    path = shared("labels", "rsna_pneumonia_stage_2_train_labels.csv.zip")
    raw = pd.read_csv(path)
    table = _load(source="rsna", labels_file=str(path), verify_images=False)
    assert len(table.frame) == raw["patientId"].nunique()
    assert int(table.frame["Pneumonia"].sum()) == raw.loc[raw["Target"] == 1, "patientId"].nunique()


def test_kermany_class_folders_with_patient_keys():
    root = shared("cxr", "kermany224")
    table = _load(
        source="folders",
        root=str(root),
        patient_pattern=r"IM-(\d+)-|person(\d+)_",
        split={"fractions": {"train": 0.85, "val": 0.15}},
    )
    frame = table.frame
    assert len(frame) == 5216 and table.images_verified
    assert int(frame["Pneumonia"].sum()) == 3875 and int(frame["No_Finding"].sum()) == 1341
    # The patient grouping derived from file names equals the one in the dataset's labels.csv.
    ref = pd.read_csv(root / "labels.csv").set_index("path")["patient_key"]
    ours = frame.set_index("image_id")["patient_id"]
    pairs = pd.DataFrame({"ours": ours, "ref": ref.loc[ours.index]})
    assert pairs.groupby("ours")["ref"].nunique().max() == 1
    assert pairs.groupby("ref")["ours"].nunique().max() == 1
    assert patient_overlap(frame) == {}
    for path in frame.groupby("Pneumonia")["path"].first():
        assert decode(path).shape == (224, 224)
    val_share = (frame["split"] == "val").mean()
    assert 0.12 < val_share < 0.18


def test_kermany_manifest_agrees_with_folders():
    root = shared("cxr", "kermany224")
    manifest = _load(source="manifest", labels_file=str(root / "labels.csv"))
    assert manifest.findings == ["Pneumonia"]
    assert manifest.frame["patient_id"].nunique() == 2635
    folders = _load(source="folders", root=str(root)).frame.set_index("image_id")
    m = manifest.frame.set_index("image_id")
    assert (m["Pneumonia"] == folders.loc[m.index, "Pneumonia"]).all()
