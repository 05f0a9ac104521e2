"""Adapters on small files written here in each dataset's official format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from diagnostics.data.config import parse_dataset_config
from diagnostics.data.cxr import DatasetError, load_dataset


def _load(**cfg):
    return load_dataset(parse_dataset_config(cfg))


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_mimic_cxr_joins_study_labels_to_images(tmp_path):
    chex = pd.DataFrame(
        {
            "subject_id": [10000032, 10000032, 11000011],
            "study_id": [50414267, 53189527, 51111111],
            "Pneumonia": [1.0, -1.0, np.nan],
            "Pleural Effusion": [0.0, 1.0, np.nan],
            "No Finding": [np.nan, np.nan, 1.0],
        }
    )
    meta = pd.DataFrame(
        {
            "dicom_id": ["d1", "d2", "d3", "d4", "d5"],
            "subject_id": [10000032, 10000032, 10000032, 11000011, 12000000],
            "study_id": [50414267, 50414267, 53189527, 51111111, 52222222],
            "ViewPosition": ["PA", "LATERAL", "AP", "PA", "PA"],
        }
    )
    split = pd.DataFrame(
        {
            "dicom_id": ["d1", "d2", "d3", "d4", "d5"],
            "study_id": [0] * 5,
            "subject_id": [0] * 5,
            "split": ["train", "train", "train", "validate", "test"],
        }
    )
    chex.to_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    meta.to_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    split.to_csv(tmp_path / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    for sub, study, dicom in [
        (10000032, 50414267, "d1"),
        (10000032, 53189527, "d3"),
        (11000011, 51111111, "d4"),
    ]:
        _touch(tmp_path / f"files/p{str(sub)[:2]}/p{sub}/s{study}/{dicom}.jpg")

    table = _load(
        source="mimic_cxr",
        root=str(tmp_path),
        views=["PA", "AP"],
        split_file=str(tmp_path / "mimic-cxr-2.0.0-split.csv.gz"),
        split={"method": "official"},
        uncertain="ones",
    )
    f = table.frame.set_index("image_id")
    assert list(f.index) == ["d1", "d3", "d4"]  # d2 lateral, d5 has no label row
    assert any("1 images dropped: their study has no row" in n for n in table.notes)
    assert f.loc["d3", "Pneumonia"] == 1.0  # uncertain -> ones
    assert f.loc["d3", "Effusion"] == 1.0 and f.loc["d4", "Effusion"] == 0  # blank -> 0 by default
    assert f.loc["d4", "split"] == "val"
    assert f.loc["d1", "patient_id"] == f.loc["d3", "patient_id"] == "10000032"


def test_chexpert_paths_resolve_with_or_without_the_prefix(tmp_path):
    rel = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    df = pd.DataFrame(
        [{"Path": rel, "Sex": "Female", "Age": 68, "Frontal/Lateral": "Frontal", "AP/PA": "AP"}]
    )
    from diagnostics.data.labels import CHEXPERT_MAP

    for col in CHEXPERT_MAP:
        df[col] = np.nan
    df["Pneumonia"] = 1.0
    df.to_csv(tmp_path / "train.csv", index=False)
    _touch(tmp_path / rel)
    above = _load(source="chexpert", root=str(tmp_path), split={"fractions": {"train": 1.0}})
    inside = _load(
        source="chexpert",
        root=str(tmp_path / "CheXpert-v1.0-small"),
        labels_file=str(tmp_path / "train.csv"),
        split={"fractions": {"train": 1.0}},
    )
    assert above.images_verified and inside.images_verified
    assert above.frame["sex"].iloc[0] == "F" and above.frame["patient_id"].iloc[0] == "patient00001"


def test_vindr_local_and_global_labels(tmp_path):
    local = pd.DataFrame(
        {
            "image_id": ["a", "a", "a", "b", "b", "b"],
            "class_name": [
                "Cardiomegaly",
                "Cardiomegaly",
                "Pleural effusion",
                "No finding",
                "No finding",
                "Nodule/Mass",
            ],
            "class_id": [3, 3, 10, 14, 14, 8],
            "rad_id": ["R1", "R2", "R3", "R1", "R2", "R3"],
        }
    )
    glob = pd.DataFrame(
        {
            "image_id": ["a", "a", "a", "b", "b", "b"],
            "rad_ID": ["R1", "R2", "R3"] * 2,
            "Tuberculosis": [1, 1, 0, 0, 0, 1],
            "Lung tumor": [0, 0, 0, 1, 0, 0],
            "Other diseases": [1, 0, 0, 0, 0, 0],
            "No finding": [0, 0, 0, 0, 1, 0],
        }
    )
    local.to_csv(tmp_path / "train.csv", index=False)
    glob.to_csv(tmp_path / "image_labels_train.csv", index=False)
    common = dict(
        source="vindr_cxr",
        root=str(tmp_path),
        verify_images=False,
        global_labels_file=str(tmp_path / "image_labels_train.csv"),
    )
    maj = _load(**common).frame.set_index("image_id")
    anyr = _load(**common, reader_aggregation="any").frame.set_index("image_id")
    assert maj.loc["a", "Cardiomegaly"] == 1 and maj.loc["a", "Effusion"] == 0
    assert anyr.loc["a", "Effusion"] == 1
    assert maj.loc["a", "Tuberculosis"] == 1 and maj.loc["b", "Tuberculosis"] == 0
    # Nodule/Mass (R3, local) and Lung tumor (R1, global) are both Lung_Lesion: 2 of 3 readers.
    assert maj.loc["b", "Lung_Lesion"] == 1
    assert maj.loc["b", "No_Finding"] == 0 and anyr.loc["b", "No_Finding"] == 0


def test_vindr_unknown_class_is_refused(tmp_path):
    pd.DataFrame({"image_id": ["a"], "class_name": ["Dragon"], "rad_id": ["R1"]}).to_csv(
        tmp_path / "train.csv", index=False
    )
    with pytest.raises(DatasetError, match="Dragon"):
        _load(source="vindr_cxr", root=str(tmp_path), verify_images=False)


def test_manifest_label_columns_views_and_missing(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _touch(tmp_path / "img" / name)
    pd.DataFrame(
        {
            "path": ["img/a.png", "img/b.png", "img/c.png", "img/d.png"],
            "patient_id": ["p1", "p1", "p2", "p3"],
            "view": ["PA", "LATERAL", "AP", "PA"],
            "Pleural Effusion": ["1", "0", "", "1"],
            "label_pneumonia": ["0", "1", "1", "0"],
            "comment": ["x", "y", "z", "w"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DatasetError, match="1 of 3 labelled images are not on disk"):
        _load(source="manifest", labels_file=str(tmp_path / "m.csv"), views=["PA", "AP"])
    table = _load(
        source="manifest",
        labels_file=str(tmp_path / "m.csv"),
        views=["PA", "AP"],
        missing_images="drop",
        findings=["Pneumonia", "Effusion", "Nodule"],
    )
    f = table.frame.set_index("image_id")
    assert list(f.index) == ["img/a.png", "img/c.png"]
    assert np.isnan(f.loc["img/c.png", "Effusion"])  # blank stays unknown
    assert f["Nodule"].isna().all()
    assert table.findings == ["Pneumonia", "Effusion", "Nodule"]
    assert any("1 images of other views dropped" in n for n in table.notes)
    assert any("not on disk: dropped" in n for n in table.notes)


def test_manifest_refuses_bad_values_and_missing_columns(tmp_path):
    pd.DataFrame({"path": ["a.png"], "Pneumonia": ["yes"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DatasetError, match="not 0, 1 or blank"):
        _load(source="manifest", labels_file=str(tmp_path / "m.csv"), verify_images=False)
    pd.DataFrame({"file": ["a.png"], "Pneumonia": [1]}).to_csv(tmp_path / "n.csv", index=False)
    with pytest.raises(DatasetError, match="missing column"):
        _load(source="manifest", labels_file=str(tmp_path / "n.csv"), verify_images=False)
    pd.DataFrame({"path": ["a.png"], "score": [1]}).to_csv(tmp_path / "o.csv", index=False)
    with pytest.raises(DatasetError, match="no label columns"):
        _load(source="manifest", labels_file=str(tmp_path / "o.csv"), verify_images=False)


def test_folders_with_explicit_class_labels(tmp_path):
    for cls, n in (("normal", 2), ("covid", 3)):
        for i in range(n):
            _touch(tmp_path / cls / f"pt{i}_img.png")
    with pytest.raises(DatasetError, match="not findings"):
        _load(source="folders", root=str(tmp_path))
    table = _load(
        source="folders",
        root=str(tmp_path),
        patient_pattern=r"pt(\d+)_",
        class_labels={
            "normal": {"No_Finding": 1, "Pneumonia": 0},
            "covid": {"Pneumonia": 1, "No_Finding": 0},
        },
    )
    assert int(table.frame["Pneumonia"].sum()) == 3
    assert table.frame["patient_id"].nunique() == 3  # pt0..pt2 across both folders


def test_config_rejects_unknown_keys_and_findings():
    with pytest.raises(ValidationError):
        parse_dataset_config({"source": "nih14", "labels_file": "x", "reader_aggregation": "any"})
    with pytest.raises(ValidationError):
        parse_dataset_config({"source": "martian", "labels_file": "x"})
    with pytest.raises(ValidationError, match="Gout"):
        parse_dataset_config({"source": "manifest", "labels_file": "x", "findings": ["Gout"]})


def test_missing_label_file_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        _load(source="nih14", labels_file=str(tmp_path / "nope.csv"), verify_images=False)
    with pytest.raises(DatasetError, match="none of"):
        _load(source="rsna", root=str(tmp_path), verify_images=False)


def test_manifest_blank_patient_keys_are_not_merged(tmp_path):
    (tmp_path / "m.csv").write_text("path,patient_id,Pneumonia\na.png,,1\nb.png,,0\nc.png,p1,0\n")
    table = _load(source="manifest", labels_file=str(tmp_path / "m.csv"), verify_images=False)
    assert table.frame["patient_id"].nunique() == 3
    assert any("2 rows have no patient key" in n for n in table.notes)


def test_errors_do_not_echo_paths_or_cell_values(tmp_path):
    # Hospital exports put record numbers in paths and, when mis-mapped, in label columns.
    (tmp_path / "m.csv").write_text("path,patient_id,Pneumonia\nMRN0012345/x.dcm,p1,1\n")
    with pytest.raises(DatasetError) as err:
        _load(source="manifest", labels_file=str(tmp_path / "m.csv"))
    assert "MRN0012345" not in str(err.value) and "1 of 1 labelled images" in str(err.value)
    (tmp_path / "n.csv").write_text("path,Pneumonia\na.png,MRN0012345\n")
    with pytest.raises(DatasetError) as err:
        _load(source="manifest", labels_file=str(tmp_path / "n.csv"), verify_images=False)
    assert "MRN0012345" not in str(err.value) and "data row 1" in str(err.value)


def test_folders_pattern_with_an_empty_match_falls_back(tmp_path):
    _touch(tmp_path / "PNEUMONIA" / "scan.png")
    table = _load(source="folders", root=str(tmp_path), patient_pattern=r"(\d*)")
    assert len(table.frame) == 1
    assert any("did not match patient_pattern" in n for n in table.notes)


def test_manifest_misspelled_label_column_is_an_error(tmp_path):
    (tmp_path / "m.csv").write_text("path,label_pneumonai,label_effusion,comment\na.png,1,0,x\n")
    with pytest.raises(DatasetError, match="pneumonai"):
        _load(source="manifest", labels_file=str(tmp_path / "m.csv"), verify_images=False)
    (tmp_path / "n.csv").write_text("path,Pneumonia,comment\na.png,1,x\n")
    table = _load(source="manifest", labels_file=str(tmp_path / "n.csv"), verify_images=False)
    assert any("columns not used as labels: comment" in n for n in table.notes)


def test_missing_root_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"root .* does not exist"):
        _load(source="chexpert", root=str(tmp_path / "nowhere"), verify_images=False)
