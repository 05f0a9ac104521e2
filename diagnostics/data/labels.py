"""The harmonised finding vocabulary, and each public dataset's map onto it.

One name per finding, whatever the dataset calls it. A finding that a dataset does not annotate
is NaN (unknown) for every image of that dataset, never 0: NaN is masked out of the loss and the
metrics. `No_Finding` is 1 when the dataset's readers found nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from diagnostics.contract import FINDINGS, NIH14  # the vocabulary is a contract of both sides

# Dataset label -> harmonised finding. None means "read but not harmonised" (dropped on purpose).
NIH14_MAP: dict[str, str | None] = {name: name for name in NIH14} | {"No Finding": "No_Finding"}

CHEXPERT_MAP: dict[str, str | None] = {
    "No Finding": "No_Finding",
    "Enlarged Cardiomediastinum": "Enlarged_Cardiomediastinum",
    "Cardiomegaly": "Cardiomegaly",
    "Lung Opacity": "Lung_Opacity",
    "Lung Lesion": "Lung_Lesion",
    "Edema": "Edema",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Atelectasis": "Atelectasis",
    "Pneumothorax": "Pneumothorax",
    "Pleural Effusion": "Effusion",
    "Pleural Other": "Pleural_Other",
    "Fracture": "Fracture",
    "Support Devices": "Support_Devices",
}
# MIMIC-CXR-JPG's chexpert and negbio label files use the CheXpert observation names.
MIMIC_MAP = CHEXPERT_MAP

# VinDr-CXR local labels (boxes, train.csv) and global labels (image_labels_train.csv).
VINDR_LOCAL_MAP: dict[str, str | None] = {
    "Aortic enlargement": "Aortic_Enlargement",
    "Atelectasis": "Atelectasis",
    "Calcification": "Calcification",
    "Cardiomegaly": "Cardiomegaly",
    "Clavicle fracture": "Fracture",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Emphysema": "Emphysema",
    "Enlarged PA": None,  # pulmonary artery enlargement: no harmonised finding
    "ILD": "ILD",
    "Infiltration": "Infiltration",
    "Lung cavity": None,
    "Lung cyst": None,
    "Lung Opacity": "Lung_Opacity",
    "Mediastinal shift": None,
    "Nodule/Mass": "Lung_Lesion",  # VinDr does not separate nodule from mass
    "Other lesion": "Other_Lesion",
    "Pleural effusion": "Effusion",
    "Pleural thickening": "Pleural_Thickening",
    "Pneumothorax": "Pneumothorax",
    "Pulmonary fibrosis": "Fibrosis",
    "Rib fracture": "Fracture",
    "No finding": "No_Finding",
}
VINDR_GLOBAL_MAP: dict[str, str | None] = {
    "Lung tumor": "Lung_Lesion",
    "Pneumonia": "Pneumonia",
    "Tuberculosis": "Tuberculosis",
    "COPD": "COPD",
    "Other diseases": None,
    "Other disease": None,
    "No finding": "No_Finding",
}
# The 14 local findings of the VinDr-CXR train.csv (Kaggle release) and "No finding": what the
# shorter release annotates. Findings outside it are NaN for VinDr images.
VINDR_TRAIN_CSV_CLASSES = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "No finding",
)

# RSNA Pneumonia Challenge: Target = 1 means lung opacity suggestive of pneumonia.
RSNA_MAP: dict[str, str | None] = {"Target": "Pneumonia"}

DATASET_MAPS: dict[str, Mapping[str, str | None]] = {
    "nih14": NIH14_MAP,
    "chexpert": CHEXPERT_MAP,
    "mimic_cxr": MIMIC_MAP,
    "vindr_cxr": VINDR_LOCAL_MAP | VINDR_GLOBAL_MAP,
    "rsna": RSNA_MAP,
}

# Other spellings seen in manifests and class folders.
_SYNONYMS: dict[str, str] = {
    "pleural effusion": "Effusion",
    "normal": "No_Finding",
    "nodule/mass": "Lung_Lesion",
    "lung tumor": "Lung_Lesion",
    "pulmonary fibrosis": "Fibrosis",
    "aortic enlargement": "Aortic_Enlargement",
    "other lesion": "Other_Lesion",
    "interstitial lung disease": "ILD",
    "tb": "Tuberculosis",
    "opacity": "Lung_Opacity",
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


_LOOKUP: dict[str, str] = {_key(f): f for f in FINDINGS} | {
    _key(k): v for k, v in _SYNONYMS.items()
}
for _map in DATASET_MAPS.values():
    for _src, _dst in _map.items():
        if _dst is not None:
            _LOOKUP.setdefault(_key(_src), _dst)


class UnknownFindingError(KeyError, ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown finding {self.name!r}; known findings: {', '.join(FINDINGS)}"


def canonical(name: str) -> str:
    """Map any known spelling ('pleural effusion', 'Pleural_Effusion', 'PNEUMONIA') to its name."""
    try:
        return _LOOKUP[_key(name)]
    except KeyError:
        raise UnknownFindingError(name) from None


def is_finding(name: str) -> bool:
    return _key(name) in _LOOKUP


def canonical_list(names: Iterable[str]) -> list[str]:
    """Canonical names, in the given order, without duplicates."""
    out: list[str] = []
    for name in names:
        c = canonical(name)
        if c not in out:
            out.append(c)
    return out
