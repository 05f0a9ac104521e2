import pytest

from diagnostics.data import labels as L


def test_vocabulary_has_nih14_and_no_finding():
    assert len(L.NIH14) == 14
    assert set(L.NIH14) <= set(L.FINDINGS) and "No_Finding" in L.FINDINGS
    assert len(set(L.FINDINGS)) == len(L.FINDINGS)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Pleural Effusion", "Effusion"),  # CheXpert
        ("pleural effusion", "Effusion"),  # VinDr
        ("Pleural_Thickening", "Pleural_Thickening"),  # NIH spelling
        ("PNEUMONIA", "Pneumonia"),  # Kermany folder
        ("NORMAL", "No_Finding"),
        ("No finding", "No_Finding"),
        ("Nodule/Mass", "Lung_Lesion"),
        ("Lung tumor", "Lung_Lesion"),
        ("Pulmonary fibrosis", "Fibrosis"),
        ("label_pneumonia".removeprefix("label_"), "Pneumonia"),
    ],
)
def test_synonyms(name, expected):
    assert L.canonical(name) == expected


def test_every_dataset_map_points_into_the_vocabulary():
    for source, mapping in L.DATASET_MAPS.items():
        for src, dst in mapping.items():
            assert dst is None or dst in L.FINDINGS, (source, src, dst)


def test_vindr_maps_cover_local_and_global_labels():
    for name in L.VINDR_TRAIN_CSV_CLASSES:
        assert name in L.VINDR_LOCAL_MAP
    for name in ("Lung tumor", "Pneumonia", "Tuberculosis", "COPD", "No finding"):
        assert name in L.VINDR_GLOBAL_MAP


def test_unknown_finding_lists_valid_names():
    with pytest.raises(KeyError) as err:
        L.canonical("Broken Heart")
    assert "Broken Heart" in str(err.value) and "Pneumothorax" in str(err.value)


def test_canonical_list_dedupes_in_order():
    assert L.canonical_list(["pleural effusion", "Effusion", "nodule"]) == ["Effusion", "Nodule"]
