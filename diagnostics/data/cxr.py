"""Dataset adapters: each public CXR dataset's official label file and image layout -> one table.

Every adapter returns the same frame, one row per image:

    image_id    str     the dataset's image key
    path        str     where the image file is (or would be, when images are not verified)
    patient_id  str     the dataset's patient key; splits never cut through a patient
    view        str     PA / AP / LATERAL / LL ... or missing
    sex, age            where the dataset gives them (for subgroup reporting later)
    <finding>   float   one column per harmonised finding: 1, 0, or NaN (not annotated)

`load_dataset(config)` runs the adapter, then the steps common to all datasets: choosing findings,
view filtering, image verification and the patient-level split. Rows it drops are counted in
`CXRTable.notes`; nothing is dropped silently.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diagnostics.data import labels as L
from diagnostics.data.config import (
    CheXpertConfig,
    FoldersConfig,
    ManifestConfig,
    MimicCXRConfig,
    NIH14Config,
    RSNAConfig,
    VinDrCXRConfig,
)
from diagnostics.data.splits import assign_patient_splits

log = logging.getLogger(__name__)

BASE_COLUMNS = ["image_id", "path", "patient_id", "view", "sex", "age"]


class DatasetError(ValueError):
    """A dataset that cannot be loaded as configured (missing files, columns, images)."""


@dataclass
class CXRTable:
    """A labelled image table. `frame` has BASE_COLUMNS, the `findings` columns and `split`."""

    frame: pd.DataFrame
    findings: list[str]
    source: str
    images_verified: bool
    rows_read: int
    notes: list[str] = field(default_factory=list)

    def labels(self) -> np.ndarray:
        """(N, F) float32 with NaN for unknown, in `findings` order."""
        return self.frame[self.findings].to_numpy(dtype=np.float32)


@dataclass
class _Read:
    frame: pd.DataFrame
    findings: list[str]  # harmonised findings the dataset annotates
    notes: list[str] = field(default_factory=list)


def _require(path: Path | None, what: str) -> Path:
    if path is None:
        raise DatasetError(f"{what} is not set")
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{what} not found: {path} (resolved to {p.resolve()})")
    return p


def _find_default(root: Path | None, names: Iterable[str], what: str) -> Path:
    """The first of `names` (relative to root) that exists: official files at their usual place."""
    names = list(names)
    if root is not None and not Path(root).expanduser().is_dir():
        raise DatasetError(
            f"root {root} does not exist (resolved to {Path(root).expanduser().resolve()}); "
            "set it with --set data.root=PATH"
        )
    if root is None:
        raise DatasetError(f"{what} is not set, and there is no root to look for {names[0]} in")
    for name in names:
        candidate = Path(root).expanduser() / name
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{what} is not set, and none of {names} exists under {root}")


def _labels_path(path: Path | None, root: Path | None, defaults: Iterable[str], what: str) -> Path:
    return _require(path, what) if path is not None else _find_default(root, defaults, what)


def _read_csv(path: Path, **kw: Any) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kw)  # .gz / .zip inferred from the name
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc


def _need_columns(df: pd.DataFrame, columns: Iterable[str], where: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetError(f"{where}: missing column(s) {missing}; found {list(df.columns)}")


def _sex(values: pd.Series) -> pd.Series:
    m = {"m": "M", "male": "M", "f": "F", "female": "F"}
    return values.astype("string").str.strip().str.lower().map(m).astype("string")


def _index_files(root: Path, suffixes: tuple[str, ...]) -> dict[str, str]:
    """File name -> path for every file under root with one of the suffixes (NIH's images_*/)."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.lower().endswith(suffixes):
                out.setdefault(name, os.path.join(dirpath, name))
    return out


# --------------------------------------------------------------------------- NIH ChestX-ray14


def read_nih14(cfg: NIH14Config) -> _Read:
    defaults = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv.gz")
    labels_file = _labels_path(cfg.labels_file, cfg.root, defaults, "labels_file")
    df = _read_csv(labels_file, dtype={"Patient ID": str})
    _need_columns(df, ["Image Index", "Finding Labels", "Patient ID"], labels_file)
    dummies = df["Finding Labels"].astype(str).str.get_dummies(sep="|")
    unknown = sorted(set(dummies.columns) - set(L.NIH14_MAP))
    if unknown:
        raise DatasetError(f"{labels_file}: labels outside the NIH vocabulary: {unknown}")
    out = pd.DataFrame(
        {
            "image_id": df["Image Index"].astype(str),
            "patient_id": df["Patient ID"].astype(str),
            "view": df.get("View Position", pd.Series(pd.NA, index=df.index)).astype("string"),
            "sex": _sex(df.get("Patient Gender", pd.Series(pd.NA, index=df.index))),
            "age": pd.to_numeric(df.get("Patient Age"), errors="coerce"),
        }
    )
    # NIH annotates all 14 findings and "No Finding" for every image: absent means 0.
    findings = [*L.NIH14, "No_Finding"]
    for src, dst in L.NIH14_MAP.items():
        out[dst] = dummies[src].astype(np.float32) if src in dummies else np.float32(0.0)
    out["path"] = _locate_by_name(cfg.root, out["image_id"], (".png",), subdir="images")
    return _Read(out, findings)


def _locate_by_name(
    root: Path | None, names: pd.Series, suffixes: tuple[str, ...], subdir: str = ""
) -> pd.Series:
    """Paths of images found by file name anywhere under root; the expected place otherwise."""
    if root is None:
        return pd.Series(pd.NA, index=names.index, dtype="string")
    root = Path(root).expanduser()
    index = _index_files(root, suffixes) if root.is_dir() else {}
    default = root / subdir if subdir else root
    return pd.Series(
        [index.get(n, str(default / n)) for n in names], index=names.index, dtype="string"
    )


# --------------------------------------------------------------------------- CheXpert / MIMIC


def _uncertain(values: pd.DataFrame, policy: str, blank: str) -> pd.DataFrame:
    """CheXpert-style cells: 1, 0, -1 (uncertain -> `policy`), blank (not mentioned -> `blank`)."""
    values = values.apply(pd.to_numeric, errors="coerce").astype(np.float32)
    if blank == "zeros":
        values = values.fillna(0.0)
    replacement = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[policy]
    return values.mask(values == -1, replacement)


def read_chexpert(cfg: CheXpertConfig) -> _Read:
    labels_file = _labels_path(cfg.labels_file, cfg.root, ("train.csv",), "labels_file")
    df = _read_csv(labels_file)
    _need_columns(df, ["Path", *L.CHEXPERT_MAP], labels_file)
    patient = df["Path"].astype(str).str.extract(r"(patient\d+)", expand=False)
    if patient.isna().any():
        raise DatasetError(f"{labels_file}: {int(patient.isna().sum())} paths without patientNNNNN")
    frontal = df.get("Frontal/Lateral", pd.Series("", index=df.index)).astype(str)
    appa = df.get("AP/PA", pd.Series(pd.NA, index=df.index)).astype("string")
    view = appa.where(frontal.str.lower() == "frontal", "LATERAL").str.upper()
    out = pd.DataFrame(
        {
            "image_id": df["Path"].astype(str),
            "patient_id": patient.astype(str),
            "view": view.astype("string"),
            "sex": _sex(df.get("Sex", pd.Series(pd.NA, index=df.index))),
            "age": pd.to_numeric(df.get("Age"), errors="coerce"),
        }
    )
    labels = _uncertain(df[list(L.CHEXPERT_MAP)], cfg.uncertain, cfg.blank)
    findings = []
    for src, dst in L.CHEXPERT_MAP.items():
        if dst is not None:
            out[dst] = labels[src].to_numpy()
            findings.append(dst)
    out["path"] = _chexpert_paths(cfg.root, out["image_id"])
    notes = [f"uncertain (-1) labels: '{cfg.uncertain}'; blank (not mentioned): '{cfg.blank}'"]
    return _Read(out, findings, notes)


def _chexpert_paths(root: Path | None, rel: pd.Series) -> pd.Series:
    if root is None:
        return pd.Series(pd.NA, index=rel.index, dtype="string")
    root = Path(root).expanduser()
    # Path starts with "CheXpert-v1.0-small/train/..."; root may be the folder above or that one.
    first = rel.iloc[0] if len(rel) else ""
    strip = (
        bool(first) and not (root / first).exists() and (root / first.split("/", 1)[-1]).exists()
    )
    parts = rel.str.split("/", n=1).str[-1] if strip else rel
    return (str(root) + "/" + parts).astype("string")


def read_mimic_cxr(cfg: MimicCXRConfig) -> _Read:
    prefix = "mimic-cxr-2.0.0-"
    labels_file = _labels_path(
        cfg.labels_file,
        cfg.root,
        [f"{prefix}chexpert.csv.gz", f"{prefix}chexpert.csv"],
        "labels_file",
    )
    meta_file = _labels_path(
        cfg.metadata_file,
        cfg.root,
        [f"{prefix}metadata.csv.gz", f"{prefix}metadata.csv"],
        "metadata_file",
    )
    lab = _read_csv(labels_file)
    meta = _read_csv(meta_file)
    _need_columns(lab, ["subject_id", "study_id"], labels_file)
    _need_columns(meta, ["dicom_id", "subject_id", "study_id"], meta_file)
    observed = [c for c in L.MIMIC_MAP if c in lab.columns]
    if not observed:
        raise DatasetError(f"{labels_file}: none of the CheXpert observation columns found")
    merged = meta.merge(lab, on=["subject_id", "study_id"], how="left", indicator=True)
    unlabelled = int((merged["_merge"] == "left_only").sum())
    notes = [f"uncertain (-1) labels: '{cfg.uncertain}'; blank (not mentioned): '{cfg.blank}'"]
    if unlabelled:
        notes.append(f"{unlabelled:,} images dropped: their study has no row in the label file")
        merged = merged[merged["_merge"] == "both"]
    subject = merged["subject_id"].astype(int).astype(str)
    study = merged["study_id"].astype(int).astype(str)
    out = pd.DataFrame(
        {
            "image_id": merged["dicom_id"].astype(str),
            "patient_id": subject,
            "view": merged.get("ViewPosition", pd.Series(pd.NA, index=merged.index))
            .astype("string")
            .str.upper(),
            "sex": pd.Series(pd.NA, index=merged.index, dtype="string"),
            "age": np.nan,
        }
    )
    labels = _uncertain(merged[observed], cfg.uncertain, cfg.blank)
    findings = []
    for src in observed:
        dst = L.MIMIC_MAP[src]
        if dst is not None:
            out[dst] = labels[src].to_numpy()
            findings.append(dst)
    if cfg.root is not None:
        root = str(Path(cfg.root).expanduser())
        out["path"] = (
            root
            + "/files/p"
            + subject.str[:2]
            + "/p"
            + subject
            + "/s"
            + study
            + "/"
            + out["image_id"]
            + ".jpg"
        ).astype("string")
    else:
        out["path"] = pd.Series(pd.NA, index=out.index, dtype="string")
    if cfg.split_file is not None:
        split = _read_csv(_require(cfg.split_file, "split_file"))
        _need_columns(split, ["dicom_id", "split"], cfg.split_file)
        names = split.set_index("dicom_id")["split"].replace({"validate": "val"})
        out["official_split"] = out["image_id"].map(names).astype("string")
    return _Read(out.reset_index(drop=True), findings, notes)


# --------------------------------------------------------------------------- VinDr-CXR


def read_vindr_cxr(cfg: VinDrCXRConfig) -> _Read:
    """Per-reader findings -> per-image labels.

    For each image, a reader is positive for a finding when they marked it (a box in train.csv, a 1
    in the global file). `majority`: positive when more than half of the image's readers are;
    `any`: when at least one is. No_Finding comes from each reader's own verdict: a reader is
    normal when they marked "No finding" and nothing else (unharmonised labels such as
    "Enlarged PA" count as abnormal). `majority`: No_Finding = 1 when more than half of the readers
    are normal; `any` (any abnormal reader makes the image abnormal): when all of them are. An image
    whose readers disagree can thus have every finding 0 and No_Finding 0.
    VinDr-CXR gives no patient key, so each image is its own patient.
    """
    defaults = ("annotations/annotations_train.csv", "train.csv", "annotations_train.csv")
    labels_file = _labels_path(cfg.labels_file, cfg.root, defaults, "labels_file")
    local = _read_csv(labels_file)
    _need_columns(local, ["image_id", "class_name", "rad_id"], labels_file)
    unknown = sorted(set(local["class_name"]) - set(L.VINDR_LOCAL_MAP))
    if unknown:
        raise DatasetError(f"{labels_file}: classes outside the VinDr vocabulary: {unknown}")
    local = local.assign(finding=local["class_name"].map(L.VINDR_LOCAL_MAP))
    marks = local.loc[local["finding"].notna(), ["image_id", "rad_id", "finding"]]
    readers = local[["image_id", "rad_id"]]
    said_normal = local.loc[local["class_name"] == "No finding", ["image_id", "rad_id"]]
    said_abnormal = local.loc[local["class_name"] != "No finding", ["image_id", "rad_id"]]
    annotated = {L.VINDR_LOCAL_MAP[c] for c in L.VINDR_TRAIN_CSV_CLASSES} | set(marks["finding"])

    notes = [f"readers aggregated per image: '{cfg.reader_aggregation}'"]
    if cfg.global_labels_file is not None:
        gpath = _require(cfg.global_labels_file, "global_labels_file")
        glob = _read_csv(gpath)
        reader_col = "rad_ID" if "rad_ID" in glob.columns else "rad_id"
        _need_columns(glob, ["image_id", reader_col], gpath)
        gcols = [c for c in glob.columns if c in L.VINDR_LOCAL_MAP or c in L.VINDR_GLOBAL_MAP]
        long = glob.melt(id_vars=["image_id", reader_col], value_vars=gcols, var_name="label")
        long = long[pd.to_numeric(long["value"], errors="coerce") > 0]
        long = long.rename(columns={reader_col: "rad_id"})
        said_normal = pd.concat(
            [said_normal, long.loc[long["label"] == "No finding", ["image_id", "rad_id"]]]
        )
        said_abnormal = pd.concat(
            [said_abnormal, long.loc[long["label"] != "No finding", ["image_id", "rad_id"]]]
        )
        mapping = L.VINDR_LOCAL_MAP | L.VINDR_GLOBAL_MAP
        long = long.assign(finding=long["label"].map(mapping)).dropna(subset=["finding"])
        marks = pd.concat([marks, long[["image_id", "rad_id", "finding"]]], ignore_index=True)
        readers = pd.concat(
            [readers, glob[["image_id", reader_col]].rename(columns={reader_col: "rad_id"})]
        )
        annotated |= {mapping[c] for c in gcols if mapping[c] is not None}

    annotated.discard("No_Finding")
    n_readers = readers.drop_duplicates().groupby("image_id")["rad_id"].nunique()
    marks = marks[marks["finding"] != "No_Finding"].drop_duplicates()
    votes = marks.groupby(["image_id", "finding"])["rad_id"].nunique().unstack(fill_value=0)
    votes = votes.reindex(index=n_readers.index, columns=sorted(annotated), fill_value=0)
    if cfg.reader_aggregation == "majority":
        positive = votes.mul(2).gt(n_readers, axis=0)
    else:
        positive = votes.gt(0)
    findings = [f for f in L.FINDINGS if f in annotated]
    out = pd.DataFrame(
        {
            "image_id": n_readers.index.astype(str),
            "patient_id": n_readers.index.astype(str),
            "view": pd.Series(pd.NA, index=n_readers.index, dtype="string"),
            "sex": pd.Series(pd.NA, index=n_readers.index, dtype="string"),
            "age": np.nan,
        }
    ).reset_index(drop=True)
    for f in findings:
        out[f] = positive[f].to_numpy(dtype=np.float32)
    normal = said_normal.drop_duplicates().merge(
        said_abnormal.drop_duplicates(), how="left", indicator=True
    )
    normal = normal[normal["_merge"] == "left_only"]
    n_normal = normal.groupby("image_id")["rad_id"].nunique().reindex(n_readers.index, fill_value=0)
    if cfg.reader_aggregation == "majority":
        no_finding = n_normal.mul(2).gt(n_readers)
    else:
        no_finding = n_normal.eq(n_readers)
    out["No_Finding"] = no_finding.to_numpy(dtype=np.float32)
    findings.append("No_Finding")
    notes.append("VinDr-CXR has no patient key: each image is treated as its own patient")
    out["path"] = _locate_by_stem(cfg.root, out["image_id"], tuple(cfg.image_extensions))
    return _Read(out, findings, notes)


def _locate_by_stem(root: Path | None, stems: pd.Series, suffixes: tuple[str, ...]) -> pd.Series:
    if root is None:
        return pd.Series(pd.NA, index=stems.index, dtype="string")
    root = Path(root).expanduser()
    index = _index_files(root, suffixes) if root.is_dir() else {}
    by_stem = {os.path.splitext(n)[0]: p for n, p in index.items()}
    return pd.Series(
        [by_stem.get(s, str(root / f"{s}{suffixes[0]}")) for s in stems],
        index=stems.index,
        dtype="string",
    )


# --------------------------------------------------------------------------- RSNA Pneumonia


def read_rsna(cfg: RSNAConfig) -> _Read:
    defaults = ("stage_2_train_labels.csv", "stage_2_train_labels.csv.zip")
    labels_file = _labels_path(cfg.labels_file, cfg.root, defaults, "labels_file")
    df = _read_csv(labels_file)
    _need_columns(df, ["patientId", "Target"], labels_file)
    per_image = df.groupby("patientId", sort=False)["Target"].max()  # one row per box
    out = pd.DataFrame(
        {
            "image_id": per_image.index.astype(str),
            "patient_id": per_image.index.astype(str),
            "view": pd.Series(pd.NA, index=per_image.index, dtype="string"),
            "sex": pd.Series(pd.NA, index=per_image.index, dtype="string"),
            "age": np.nan,
            "Pneumonia": per_image.to_numpy(dtype=np.float32),
        }
    ).reset_index(drop=True)
    out["path"] = _locate_by_stem(cfg.root, out["image_id"], (".dcm",))
    notes = [
        f"{len(df):,} box rows -> {len(out):,} images; Target = pneumonia-like opacity",
        "RSNA's patientId names one image; images are treated as independent patients",
    ]
    return _Read(out, ["Pneumonia"], notes)


# --------------------------------------------------------------------------- generic manifest


_PATIENT_COLUMNS = ("patient_id", "patient_key", "patient")
_VIEW_COLUMNS = ("view", "view_position", "ViewPosition")


def read_manifest(cfg: ManifestConfig) -> _Read:
    labels_file = _require(cfg.labels_file, "labels_file")
    df = _read_csv(labels_file, dtype=str, keep_default_na=False, na_values=[""])
    _need_columns(df, [cfg.path_column], labels_file)
    try:
        label_columns = cfg.label_columns or _auto_label_columns(df.columns)
    except L.UnknownFindingError as exc:
        raise DatasetError(f"{labels_file}: a label_ column names no finding: {exc}") from None
    if not label_columns:
        raise DatasetError(
            f"{labels_file}: no label columns; name them after findings (e.g. Pneumonia or "
            "label_pneumonia) or set label_columns"
        )
    _need_columns(df, label_columns, labels_file)
    notes: list[str] = []
    used = {cfg.path_column, cfg.patient_column, cfg.view_column, cfg.split_column, *label_columns}
    known = {*BASE_COLUMNS, *_PATIENT_COLUMNS, *_VIEW_COLUMNS, "split"}
    ignored = [c for c in df.columns if c not in used | known and not c.startswith("mask_")]
    if ignored:
        notes.append(f"columns not used as labels: {', '.join(ignored)}")
    patient_col = cfg.patient_column or next((c for c in _PATIENT_COLUMNS if c in df.columns), None)
    if patient_col is None:
        patients = df[cfg.path_column].astype(str)
        notes.append("no patient column: each image is its own patient (splits may leak patients)")
    else:
        _need_columns(df, [patient_col], labels_file)
        blank = df[patient_col].isna() | (df[patient_col].astype(str).str.strip() == "")
        patients = df[patient_col].astype(str).where(~blank, "__row__" + df.index.astype(str))
        if blank.any():
            notes.append(
                f"{int(blank.sum())} rows have no patient key: each is its own patient "
                "(splits may leak patients)"
            )
    view_col = cfg.view_column or next((c for c in _VIEW_COLUMNS if c in df.columns), None)
    root = Path(cfg.root).expanduser() if cfg.root is not None else labels_file.parent
    paths = df[cfg.path_column].astype(str)
    out = pd.DataFrame(
        {
            "image_id": paths,
            "path": [p if os.path.isabs(p) else str(root / p) for p in paths],
            "patient_id": patients,
            "view": df[view_col].astype("string").str.upper() if view_col else pd.NA,
            "sex": _sex(df["sex"]) if "sex" in df.columns else pd.NA,
            "age": pd.to_numeric(df["age"], errors="coerce") if "age" in df.columns else np.nan,
        }
    )
    out["path"] = out["path"].astype("string")
    findings: list[str] = []
    for col, finding in label_columns.items():
        values = pd.to_numeric(df[col], errors="coerce")
        bad = df[col].notna() & (values.isna() | ~values.isin([0, 1]))
        if bad.any():
            raise DatasetError(
                # The row number, not the value: a mis-mapped column may hold identifiers.
                f"{labels_file}: column {col!r} has {int(bad.sum())} values that are not 0, 1 or "
                f"blank (first at data row {int(np.flatnonzero(bad.to_numpy())[0]) + 1})"
            )
        if finding in findings:
            raise DatasetError(f"{labels_file}: two columns map to {finding}")
        out[finding] = values.astype(np.float32)
        findings.append(finding)
    for extra in ("mask_" + f for f in findings):
        if extra in df.columns:
            out[extra] = df[extra].astype("string")
    if cfg.split_column is not None:
        _need_columns(df, [cfg.split_column], labels_file)
        out["official_split"] = df[cfg.split_column].astype("string")
    return _Read(out, findings, notes)


def _auto_label_columns(columns: Iterable[str]) -> dict[str, str]:
    """Columns named after findings. A `label_` column that names no finding is an error."""
    out: dict[str, str] = {}
    for col in columns:
        name = col[len("label_") :] if col.lower().startswith("label_") else col
        if (
            col in BASE_COLUMNS
            or col in _PATIENT_COLUMNS
            or col.startswith("mask_")
            or col == "split"
        ):
            continue
        if L.is_finding(name):
            out[col] = L.canonical(name)
        elif col.lower().startswith("label_"):
            L.canonical(name)  # raises UnknownFindingError listing the valid names
    return out


# --------------------------------------------------------------------------- class folders


def read_folders(cfg: FoldersConfig) -> _Read:
    root = _require(cfg.root, "root")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root}: no class folders")
    if cfg.class_labels is not None:
        missing = sorted(set(classes) - set(cfg.class_labels))
        if missing:
            raise DatasetError(f"{root}: folders {missing} have no entry in class_labels")
        class_labels = {
            c: {L.canonical(f): float(v) for f, v in cfg.class_labels[c].items()} for c in classes
        }
    else:
        unknown = [c for c in classes if not L.is_finding(c)]
        if unknown:
            raise DatasetError(
                f"{root}: folders {unknown} are not findings; set class_labels to map them"
            )
        named = {c: L.canonical(c) for c in classes}
        class_labels = {c: {f: float(f == named[c]) for f in named.values()} for c in classes}
    findings = L.canonical_list(f for c in classes for f in class_labels[c])
    pattern = re.compile(cfg.patient_pattern) if cfg.patient_pattern else None
    rows: list[dict[str, Any]] = []
    unmatched = 0
    suffixes = tuple(s.lower() for s in cfg.extensions)
    for c in classes:
        for entry in sorted(os.scandir(root / c), key=lambda e: e.name):
            if not entry.is_file() or not entry.name.lower().endswith(suffixes):
                continue
            patient = None
            if pattern is not None:
                m = pattern.search(entry.name)
                if m is not None:
                    hit = next(((i, g) for i, g in enumerate(m.groups() or (m[0],)) if g), None)
                    if hit is not None:
                        patient = f"{hit[0]}:{hit[1]}"
            if patient is None:
                unmatched += pattern is not None
                patient = f"{c}/{entry.name}"
            row = {"image_id": f"{c}/{entry.name}", "path": entry.path, "patient_id": patient}
            row.update({f: class_labels[c].get(f, np.nan) for f in findings})
            rows.append(row)
    out = pd.DataFrame(rows)
    out["view"] = pd.Series(pd.NA, index=out.index, dtype="string")
    out["sex"] = pd.Series(pd.NA, index=out.index, dtype="string")
    out["age"] = np.nan
    notes = []
    if pattern is None:
        notes.append("no patient_pattern: each image is its own patient (splits may leak patients)")
    elif unmatched:
        notes.append(f"{unmatched} file names did not match patient_pattern: own patient each")
    return _Read(out, findings, notes)


# --------------------------------------------------------------------------- common steps

_READERS = {
    "nih14": read_nih14,
    "chexpert": read_chexpert,
    "mimic_cxr": read_mimic_cxr,
    "vindr_cxr": read_vindr_cxr,
    "rsna": read_rsna,
    "manifest": read_manifest,
    "folders": read_folders,
}


def load_dataset(cfg: Any) -> CXRTable:
    """Read, label, filter, verify and split a dataset as its config says."""
    read = _READERS[cfg.source](cfg)
    frame, notes = read.frame, list(read.notes)
    rows_read = len(frame)

    if cfg.findings is not None:
        findings = list(cfg.findings)
        for f in findings:
            if f not in read.findings:
                frame[f] = np.float32(np.nan)
                notes.append(f"{f} is not annotated by {cfg.source}: NaN (unknown) for every image")
    else:
        findings = list(read.findings)

    if cfg.views is not None:
        known = frame["view"].notna()
        keep = ~known | frame["view"].isin(cfg.views)
        dropped, unknown = int((~keep).sum()), int((~known).sum())
        if dropped:
            notes.append(f"views {', '.join(cfg.views)}: {dropped:,} images of other views dropped")
        if unknown:
            notes.append(f"views {', '.join(cfg.views)}: {unknown:,} images of unknown view kept")
        frame = frame[keep]

    if cfg.max_images is not None and len(frame) > cfg.max_images:
        notes.append(
            f"max_images={cfg.max_images}: {len(frame) - cfg.max_images:,} images left out"
        )
        # A seeded sample, not the first rows: files are often ordered by class or patient.
        frame = frame.sample(n=cfg.max_images, random_state=cfg.split.seed).sort_index()

    verified = False
    if cfg.verify_images:
        if frame["path"].isna().all():
            raise DatasetError("verify_images is on but no image root is set (root)")
        exists = np.array([isinstance(p, str) and os.path.isfile(p) for p in frame["path"]])
        missing = int((~exists).sum())
        if missing and cfg.missing_images == "error":
            # No example path: image paths often carry patient keys (MIMIC, hospital exports).
            # The folder searched comes from the config, so it is safe to show.
            folder = cfg.root if cfg.root is not None else Path(cfg.labels_file).parent
            raise DatasetError(
                f"{missing:,} of {len(frame):,} labelled images are not on disk under "
                f"{folder} (resolved to {Path(folder).expanduser().resolve()}); "
                "fix root, set missing_images: drop, or verify_images: false"
            )
        if missing:
            notes.append(f"{missing:,} labelled images not on disk: dropped (missing_images: drop)")
            frame = frame[exists]
        verified = True
    if frame.empty:
        raise DatasetError("no images left after filtering")

    frame = frame.reset_index(drop=True)
    frame["split"] = _split(frame, cfg)
    columns = [*BASE_COLUMNS, *findings, "split"]
    extras = [c for c in frame.columns if c not in columns and c.startswith(("mask_", "official"))]
    return CXRTable(
        frame=frame[columns + extras],
        findings=findings,
        source=cfg.source,
        images_verified=verified,
        rows_read=rows_read,
        notes=notes,
    )


def _split(frame: pd.DataFrame, cfg: Any) -> pd.Series:
    if cfg.split.method == "official":
        if "official_split" not in frame.columns:
            raise DatasetError(f"{cfg.source} has no official split here; use method: patient")
        if frame["official_split"].isna().any():
            raise DatasetError("some images have no official split")
        return frame["official_split"].astype(str)
    return assign_patient_splits(frame["patient_id"], cfg.split.fractions, cfg.split.seed)
