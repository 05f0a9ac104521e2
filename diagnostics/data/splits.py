"""Patient-level splits: every image of a patient lands in the same split.

The order of patients is a hash of (seed, patient key), so a split depends only on the seed and
the set of patients, not on row order. Cuts are made on patient counts, so fractions are met to
within one patient.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd


def _rank_key(seed: int, patient: str) -> str:
    return hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()


def assign_patient_splits(
    patients: Sequence[str] | pd.Series, fractions: Mapping[str, float], seed: int = 0
) -> pd.Series:
    """Return the split name of each row, from the row's patient key."""
    keys = pd.Series(patients, dtype="string").astype(str)
    unique = sorted(set(keys), key=lambda p: _rank_key(seed, p))
    names = list(fractions)
    # Largest-remainder rounding so that the counts sum to the number of patients.
    n = len(unique)
    exact = np.array([fractions[k] * n for k in names])
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts))[: n - counts.sum()]:
        counts[i] += 1
    which: dict[str, str] = {}
    start = 0
    for name, count in zip(names, counts, strict=True):
        for p in unique[start : start + count]:
            which[p] = name
        start += count
    return pd.Series([which[p] for p in keys], index=getattr(patients, "index", None), name="split")


def patient_overlap(frame: pd.DataFrame, split_col: str = "split") -> dict[str, list[str]]:
    """Patients found in more than one split: {"train|val": [patient, ...], ...}. Empty is good."""
    by_split = {s: set(g["patient_id"].astype(str)) for s, g in frame.groupby(split_col)}
    names = sorted(by_split)
    out: dict[str, list[str]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = sorted(by_split[a] & by_split[b])
            if shared:
                out[f"{a}|{b}"] = shared
    return out


def pseudonym(patient: str) -> str:
    """A short stable pseudonym for printing a patient key without printing the key itself."""
    return hashlib.sha256(patient.encode()).hexdigest()[:10]
