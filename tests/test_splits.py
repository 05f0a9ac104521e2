import pandas as pd
import pytest

from diagnostics.data.splits import assign_patient_splits, patient_overlap


def _patients(n_patients: int = 500, per: int = 3) -> pd.Series:
    return pd.Series([f"P{i // per:04d}" for i in range(n_patients * per)])


def test_no_patient_in_two_splits_and_fractions_met():
    patients = _patients()
    split = assign_patient_splits(patients, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=1)
    frame = pd.DataFrame({"patient_id": patients, "split": split})
    assert patient_overlap(frame) == {}
    counts = frame.groupby("split")["patient_id"].nunique()
    assert counts.to_dict() == {"train": 350, "val": 50, "test": 100}


def test_deterministic_by_seed_and_independent_of_row_order():
    patients = _patients(200)
    fr = {"train": 0.8, "val": 0.2}
    a = assign_patient_splits(patients, fr, seed=7)
    shuffled = patients.sample(frac=1.0, random_state=0)
    b = assign_patient_splits(shuffled, fr, seed=7)
    assert (a == b.reindex(a.index)).all()
    c = assign_patient_splits(patients, fr, seed=8)
    assert not (a == c).all()


def test_overlap_is_reported():
    frame = pd.DataFrame(
        {"patient_id": ["a", "a", "b", "c"], "split": ["train", "val", "train", "test"]}
    )
    assert patient_overlap(frame) == {"train|val": ["a"]}


def test_small_counts_sum_up():
    split = assign_patient_splits(pd.Series(["a", "b", "c"]), {"train": 0.5, "val": 0.5})
    assert len(split) == 3 and set(split) <= {"train", "val"}


@pytest.mark.parametrize("fractions", [{"train": 0.5}, {"train": 0.9, "val": 0.2}])
def test_fractions_must_sum_to_one(fractions):
    from pydantic import ValidationError

    from diagnostics.data.config import SplitConfig

    with pytest.raises(ValidationError):
        SplitConfig(fractions=fractions)
