"""Typed dataset configs: which dataset, where its labels and images are, how to label and split it.

A config's `source` picks the adapter, and each adapter accepts only its own options: an unknown
key is an error, never silently ignored. Relative paths are resolved against the current working
directory (the project root when run from the README).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from diagnostics.data.labels import canonical, canonical_list


class SplitConfig(BaseModel):
    """Patient-level split. Fractions are of patients, not images; they must sum to 1."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["patient", "official"] = "patient"
    fractions: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    seed: int = 0

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("at least one split is needed")
        if any(f < 0 for f in v.values()):
            raise ValueError("fractions must be >= 0")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1, got {sum(v.values()):.4f}")
        return v


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: Path | None = Field(None, description="image root folder")
    findings: list[str] | None = Field(
        None, description="harmonised findings to keep, in output order; default: all annotated"
    )
    views: list[str] | None = Field(
        None, description="keep only these views (e.g. [PA, AP]); images of unknown view are kept"
    )
    verify_images: bool = Field(True, description="check that every image file exists")
    missing_images: Literal["error", "drop"] = Field(
        "error", description="what to do when a labelled image is not on disk (drops are reported)"
    )
    max_images: int | None = Field(
        None, ge=1, description="keep N images, sampled with split.seed (quick runs, tests)"
    )
    split: SplitConfig = Field(default_factory=SplitConfig)

    @field_validator("findings")
    @classmethod
    def _canonical_findings(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else canonical_list(v)

    @field_validator("views")
    @classmethod
    def _upper_views(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [s.strip().upper() for s in v]


class NIH14Config(_Base):
    """NIH ChestX-ray14: `Data_Entry_2017*.csv`; images anywhere under `root` (images_*/images/)."""

    source: Literal["nih14"]
    labels_file: Path | None = None  # default: Data_Entry_2017*.csv under root


class CheXpertConfig(_Base):
    """CheXpert `train.csv`/`valid.csv`; `Path` is resolved against `root` (with or without the
    `CheXpert-v1.0*/` prefix). -1 (uncertain) follows `uncertain`. A blank cell means the report
    did not mention the observation; `blank: zeros` (the default, as in the CheXpert paper) reads
    it as negative. `nan` leaves it unknown, but then most findings have no negatives at all (the
    labeller writes 0 only for explicit negations, and never for No Finding)."""

    source: Literal["chexpert"]
    labels_file: Path | None = None  # default: train.csv under root
    uncertain: Literal["ignore", "zeros", "ones"] = "ignore"
    blank: Literal["nan", "zeros"] = "zeros"


class MimicCXRConfig(_Base):
    """MIMIC-CXR-JPG: the chexpert or negbio label CSV (per study) joined to the metadata CSV
    (per image); images at `root/files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`."""

    source: Literal["mimic_cxr"]
    labels_file: Path | None = None  # default: mimic-cxr-2.0.0-chexpert.csv(.gz) under root
    metadata_file: Path | None = None  # default: mimic-cxr-2.0.0-metadata.csv(.gz) under root
    split_file: Path | None = None
    uncertain: Literal["ignore", "zeros", "ones"] = "ignore"
    blank: Literal["nan", "zeros"] = "zeros"


class VinDrCXRConfig(_Base):
    """VinDr-CXR: one row per radiologist finding (`train.csv`), optionally the global labels
    (`image_labels_train.csv`). Readers are aggregated per image."""

    source: Literal["vindr_cxr"]
    labels_file: Path | None = None  # default: train.csv (annotations/ or root)
    global_labels_file: Path | None = None
    reader_aggregation: Literal["majority", "any"] = "majority"
    image_extensions: list[str] = Field(default_factory=lambda: [".dicom", ".dcm", ".png", ".jpg"])


class RSNAConfig(_Base):
    """RSNA Pneumonia Detection Challenge: `stage_2_train_labels.csv` (or the .zip), one row per
    box; `Target` = 1 is pneumonia-like opacity. Images are `root/<patientId>.dcm`."""

    source: Literal["rsna"]
    labels_file: Path | None = None  # default: stage_2_train_labels.csv(.zip) under root


class ManifestConfig(_Base):
    """A generic CSV: a path column plus label columns. Label columns are those named after a
    finding (`Pneumonia`, `label_pneumonia`, `Pleural Effusion`) unless `label_columns` is given.
    Paths are relative to `root`, which defaults to the manifest's folder."""

    source: Literal["manifest"]
    labels_file: Path
    path_column: str = "path"
    patient_column: str | None = Field(
        None, description="default: the first of patient_id, patient_key, patient present"
    )
    view_column: str | None = None
    split_column: str | None = Field(
        None, description="a column naming each image's split; used with split.method: official"
    )
    label_columns: dict[str, str] | None = Field(None, description="column -> finding")

    @field_validator("label_columns")
    @classmethod
    def _canonical_labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else {col: canonical(f) for col, f in v.items()}


class FoldersConfig(_Base):
    """Class folders, `root/CLASS/*.png|jpg|dcm`. By default a folder named after a finding makes
    that finding 1 and the other folders' findings 0 (`NORMAL` is No_Finding)."""

    source: Literal["folders"]
    class_labels: dict[str, dict[str, float]] | None = Field(
        None, description="folder -> {finding: 0/1}; default derived from folder names"
    )
    patient_pattern: str | None = Field(
        None,
        description="regex on the file name; its first matching group is the patient key. "
        "Without it each image is its own patient.",
    )
    extensions: list[str] = Field(default_factory=lambda: [".png", ".jpg", ".jpeg", ".dcm"])

    @field_validator("patient_pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(
                    f"patient_pattern is not a valid regular expression: {exc}"
                ) from exc
        return v

    @field_validator("class_labels")
    @classmethod
    def _canonical_classes(
        cls, v: dict[str, dict[str, float]] | None
    ) -> dict[str, dict[str, float]] | None:
        if v is None:
            return None
        out = {}
        for folder, labels in v.items():
            if any(value not in (0, 1) for value in labels.values()):
                raise ValueError(f"class_labels[{folder}]: values must be 0 or 1")
            out[folder] = {canonical(f): float(value) for f, value in labels.items()}
        return out

    @model_validator(mode="after")
    def _root_required(self) -> FoldersConfig:
        if self.root is None:
            raise ValueError("folders needs root")
        return self


DatasetConfig = Annotated[
    NIH14Config
    | CheXpertConfig
    | MimicCXRConfig
    | VinDrCXRConfig
    | RSNAConfig
    | ManifestConfig
    | FoldersConfig,
    Field(discriminator="source"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(DatasetConfig)
SOURCES = ("nih14", "chexpert", "mimic_cxr", "vindr_cxr", "rsna", "manifest", "folders")


def parse_dataset_config(data: dict[str, Any]) -> Any:
    """Validate a `data:` mapping into the config of its `source`."""
    return _ADAPTER.validate_python(data)
