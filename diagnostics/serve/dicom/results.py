"""DICOM result objects for the hospital PACS, made with highdicom: pure functions, no I/O.

- `ai_report`: the AI's study-level findings as a Comprehensive SR following TID 1500
  "Measurement Report", flagged everywhere as UNREVIEWED (PARTIAL, UNVERIFIED, the series
  description, and a TEXT item in the content).
- `review_report`: a clinician's decisions on those findings as a new, VERIFIED and COMPLETE
  Comprehensive SR whose predecessor documents are the AI SR (and earlier reviews, if re-signed).
- `heatmap_capture`: the heat-map overlay as an RGB Secondary Capture with "AI OUTPUT -
  UNREVIEWED" burned into a black band above the image, so any viewer shows what it is.

Patient and study attributes come only from the source images (highdicom's
`copy_patient_and_study_information`); nothing about the patient is added. Attributes the
IODs require as Type 2 stay empty when the source lacks them. highdicom is never handed the
patient's values to check (its checks would put them into warnings), only empty placeholders.

Coding: finding labels with an established SNOMED CT (or DCM chest-CAD) concept use it;
the rest, and the service's own concepts (calibrated probability, threshold, review decision),
use the local scheme `99DIAGCXR`, declared in CodingSchemeIdentificationSequence.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DT

log = logging.getLogger(__name__)

UNREVIEWED = "UNREVIEWED AI RESULT - not a diagnosis; a clinician must review it."
REVIEWED = "Reviewed by a clinician"
UTF8 = "ISO_IR 192"  # free text (notes, display names) may hold any character

# The local coding scheme ("99" prefix: a private scheme, PS3.16 section 8.2).
SCHEME = "99DIAGCXR"


def _coding_scheme() -> CodingSchemeIdentificationItem:
    """CodingSchemeIdentificationSequence item declaring the local scheme."""
    return CodingSchemeIdentificationItem(
        designator=SCHEME,
        name="diagnostics chest X-ray service local codes",
        responsible_organization="diagnostics (open source)",
    )


def _local(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


# No standard concept is defined as "calibrated probability, 0..1" (DCM "Certainty of
# Finding" is the CAD percent scale), so the score and its operating point are local concepts.
PROBABILITY = _local("P-CALIBRATED", "Calibrated probability of finding")
THRESHOLD = _local("THRESHOLD", "Decision threshold (operating point)")
POPULATION = _local("POPULATION", "Intended-population check")
STUDY_REF = _local("STUDY-REF", "Service study reference")
DECISION = _local("DECISION", "Clinician decision on AI result")
CORRECTED_TO = _local("CORRECTED-TO", "Corrected finding")
VERDICTS = {
    "agree": _local("AGREE", "Agrees with AI result"),
    "disagree": _local("DISAGREE", "Disagrees with AI result"),
    "uncertain": _local("UNCERTAIN", "Clinician uncertain"),
    "corrected": _local("CORRECTED", "AI finding corrected"),
    "unlisted": _local("UNLISTED", "Finding added by clinician"),
}
RATIO = codes.UCUM.NoUnits  # ("1", UCUM): a probability is a pure number in 0..1
COMMENT = codes.DCM.Comment  # (121106, DCM)
# CID 240 "Present-Absent": the call at the operating point; Undetermined = no call made.
PRESENT = codes.cid240.Present  # (52101004, SCT)
ABSENT = codes.cid240.Absent  # (272519000, SCT)
UNDETERMINED = codes.cid240.Undetermined  # (373068000, SCT)
CHEST_IMAGING = codes.SCT.ChestImaging  # (413815006, SCT): the procedure reported
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_MODALITIES = {code.value: code for code in codes.cid29.concepts.values()}

# Findings with a concept in DICOM's chest-CAD context groups (CID 6102/6104) or SNOMED CT.
_STANDARD_FINDINGS: dict[str, tuple[str, str, str]] = {
    "pneumonia": ("233604007", "SCT", "Pneumonia"),
    "pneumothorax": ("36118008", "SCT", "Pneumothorax"),
    "effusion": ("60046008", "SCT", "Pleural effusion"),
    "pleuraleffusion": ("60046008", "SCT", "Pleural effusion"),
    "cardiomegaly": ("287272002", "SCT", "Cardiomegaly"),
    "edema": ("19242006", "SCT", "Pulmonary edema"),
    "nodule": ("27925004", "SCT", "Nodule"),
    "mass": ("4147007", "SCT", "Mass"),
    "fibrosis": ("112674009", "SCT", "Fibrosis"),
    "infiltration": ("112121", "DCM", "Infiltrate"),
    "lungopacity": ("112001", "DCM", "Opacity"),
}


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str  # model name, e.g. "cxr-demo"
    version: str  # registry version or "unversioned"
    model_sha256: str  # hex: the identity of the very model file
    manufacturer: str = "diagnostics (open source)"


@dataclass(frozen=True)
class ReportFinding:
    label: str  # machine name, e.g. "pneumonia"
    display: str  # English display name, e.g. "Pneumonia"
    probability: float  # calibrated, 0..1
    threshold: float  # the operating point
    positive: bool | None  # None: no call made (outside the intended population)
    image_uids: Sequence[str] = ()  # SOP Instance UIDs it was scored on (empty: all sources)


@dataclass(frozen=True)
class ReviewDecision:
    label: str
    display: str
    verdict: str  # "agree" | "disagree" | "corrected" | "unlisted" (a finding the reviewer added)
    corrected_label: str | None = None
    note: str = ""  # free text by the clinician (may be empty)


def finding_code(label: str, display: str) -> hd.sr.CodedConcept:
    """The coded concept of a finding: SNOMED CT / DCM where DICOM has one, else local."""
    key = re.sub(r"[\s_\-/]+", "", label.strip().lower())
    if key in _STANDARD_FINDINGS:
        value, scheme, meaning = _STANDARD_FINDINGS[key]
        return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)
    return _local(label.strip(), display.strip() or label.strip())


# --------------------------------------------------------------------------- AI report


def ai_report(
    sources: Sequence[Dataset],
    findings: Sequence[ReportFinding],
    algorithm: AlgorithmInfo,
    *,
    population: str,
    series_number: int = 9901,
    instance_number: int = 1,
    study_ref: str = "",
) -> Dataset:
    """The AI's findings on one study as an unreviewed Comprehensive SR (TID 1500)."""
    images = _study_images(sources)
    if not findings:
        raise ValueError("an AI report needs at least one finding")
    by_uid = {ds.SOPInstanceUID: ds for ds in images}
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, manufacturer=algorithm.manufacturer
    )
    groups = [_finding_group(f, images, by_uid, algorithm_id, population) for f in findings]
    # The AI is the observer (TID 1004). The model file's sha256 is its serial number: it
    # identifies this very artefact, as a serial number identifies one physical device.
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_device_uid(algorithm),
        name=algorithm.name,
        manufacturer_name=algorithm.manufacturer,
        model_name=algorithm.name,
        serial_number=algorithm.model_sha256,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    statements = [_text(COMMENT, UNREVIEWED), _text(POPULATION, population)]
    if study_ref:  # the service's own study id (random hex), not patient data
        statements.append(_text(STUDY_REF, study_ref))
    content = _measurement_report(context, groups, images, statements)
    sr = hd.sr.ComprehensiveSR(
        evidence=[_placeholder(images[0]), *images[1:]],
        content=content,
        series_instance_uid=_series_uid(images[0], series_number),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer,
        is_complete=False,  # CompletionFlag PARTIAL
        is_verified=False,  # VerificationFlag UNVERIFIED
        is_final=False,
        series_description="AI result (unreviewed)",
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        device_serial_number=_serial_number(algorithm),
        coding_schemes=[_coding_scheme()],
        specific_character_set=UTF8,
    )
    sr.copy_patient_and_study_information(images[0])
    log.info("AI SR made: %d finding(s) on %d image(s)", len(findings), len(images))
    return sr


def _finding_group(
    f: ReportFinding,
    images: list[Dataset],
    by_uid: dict[str, Dataset],
    algorithm_id: hd.sr.AlgorithmIdentification,
    population: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    probability = _unit_interval(f.probability, f"probability of {f.label!r}")
    threshold = _unit_interval(f.threshold, f"threshold of {f.label!r}")
    unknown = [uid for uid in f.image_uids if uid not in by_uid]
    if unknown:
        raise ValueError(f"finding {f.label!r} names images that are not among the sources")
    scored = [by_uid[uid] for uid in f.image_uids] or images
    code = finding_code(f.label, f.display)
    call = UNDETERMINED if f.positive is None else PRESENT if f.positive else ABSENT
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f.label),
        finding_type=code,
        algorithm_id=algorithm_id,
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=probability, unit=RATIO),
            hd.sr.Measurement(name=THRESHOLD, value=threshold, unit=RATIO),
        ],
        # Is the finding present at the operating point? (name: the finding; value: CID 240)
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=code, value=call)],
        source_images=[_source_image(ds) for ds in scored],
    )
    if f.positive is None:  # say why there is no call (TID 1501 allows TEXT evaluations)
        note = (
            "No call made: the patient is outside the model's intended population "
            f"({population}). The probability is for information only."
        )
        group[0].ContentSequence.append(_text(COMMENT, note))
    return group


# --------------------------------------------------------------------------- review report


def review_report(
    ai_sr: Dataset,
    sources: Sequence[Dataset],
    decisions: Sequence[ReviewDecision],
    *,
    reviewer: str,
    signed_at: datetime,
    series_number: int = 9902,
    instance_number: int = 1,
    previous: Sequence[Dataset] = (),
    organization: str | None = None,
) -> Dataset:
    """A clinician's decisions on the AI SR as a new, verified Comprehensive SR (TID 1500).

    `ai_sr` is referenced as a predecessor document and never modified; `previous` are earlier
    review SRs of the same AI result (a re-sign). `organization` is the Verifying Organization
    (Type 1); by default the sources' InstitutionName, else "unspecified".
    """
    images = _study_images(sources)
    if not decisions:
        raise ValueError("a review report needs at least one decision")
    if not reviewer.strip():
        raise ValueError("a review report needs the reviewer's name")
    for doc in (ai_sr, *previous):
        if doc.StudyInstanceUID != images[0].StudyInstanceUID:
            raise ValueError("the AI SR and earlier reviews must belong to the sources' study")
    tracking = _tracking_uids(ai_sr)
    groups = [_decision_group(d, images, tracking) for d in decisions]
    name = _person_name(reviewer)
    person = hd.sr.PersonObserverIdentifyingAttributes(name=name, login_name=reviewer.strip())
    context = hd.sr.ObservationContext(
        observer_person_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Person, observer_identifying_attributes=person
        )
    )
    statement = (
        f"{REVIEWED} ({reviewer.strip()}, signed {signed_at.isoformat(timespec='minutes')}). "
        f"This document records the clinician's decisions on the AI result "
        f"{ai_sr.SOPInstanceUID}."
    )
    content = _measurement_report(context, groups, images, [_text(COMMENT, statement)])
    if organization is None:
        organization = str(images[0].get("InstitutionName") or "") or "unspecified"
    sr = hd.sr.ComprehensiveSR(
        evidence=[_placeholder(images[0]), *images[1:]],
        content=content,
        series_instance_uid=_series_uid(images[0], series_number),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=str(ai_sr.get("Manufacturer") or "diagnostics (open source)"),
        is_complete=True,  # CompletionFlag COMPLETE
        is_verified=True,  # VerificationFlag VERIFIED, with the verifying observer
        is_final=True,
        verifying_observer_name=name,
        verifying_organization=organization[:64],
        previous_versions=[ai_sr, *previous],  # PredecessorDocumentsSequence
        series_description=f"AI result - {REVIEWED}",
        coding_schemes=[_coding_scheme()],
        specific_character_set=UTF8,
    )
    sr.VerifyingObserverSequence[0].VerificationDateTime = DT(signed_at)
    sr.copy_patient_and_study_information(images[0])
    log.info("review SR made: %d decision(s)", len(decisions))
    return sr


def _decision_group(
    d: ReviewDecision, images: list[Dataset], tracking: dict[str, str]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    if d.verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {d.verdict!r}; known: {', '.join(VERDICTS)}")
    added = d.verdict == "unlisted"
    label = (d.corrected_label or d.label) if added else d.label  # the finding added
    items = []
    if d.verdict == "corrected":
        if not d.corrected_label:
            raise ValueError(f"verdict 'corrected' on {d.label!r} needs the corrected label")
        corrected = finding_code(d.corrected_label, d.corrected_label)
        items.append(hd.sr.QualitativeEvaluation(name=CORRECTED_TO, value=corrected))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        # The same tracking UID as the AI's group for this finding: one finding, two reports.
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking.get(label) or hd.UID(), identifier=label
        ),
        finding_type=finding_code(label, d.display),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=DECISION, value=VERDICTS[d.verdict]),
            *items,
        ],
        source_images=[_source_image(ds) for ds in images],
    )
    if d.note.strip():
        group[0].ContentSequence.append(_text(COMMENT, d.note.strip()))
    return group


def _tracking_uids(ai_sr: Dataset) -> dict[str, str]:
    """Tracking identifier (the label) -> tracking UID of each measurement group of an SR."""
    out: dict[str, str] = {}
    for container in ai_sr.get("ContentSequence", []):
        if _concept(container) != ("126010", "DCM"):  # Imaging Measurements
            continue
        for group in container.get("ContentSequence", []):
            items = group.get("ContentSequence", [])
            ident = [i.TextValue for i in items if _concept(i) == ("112039", "DCM")]
            uid = [i.UID for i in items if _concept(i) == ("112040", "DCM")]
            if ident and uid:
                out[str(ident[0])] = str(uid[0])
    return out


# --------------------------------------------------------------------------- heat map


def heatmap_capture(
    source: Dataset,
    overlay_rgb: np.ndarray,
    finding: ReportFinding,
    algorithm: AlgorithmInfo,
    *,
    series_number: int = 9903,
    instance_number: int = 1,
) -> Dataset:
    """The heat-map overlay (H, W, 3) uint8 as an RGB Secondary Capture of `source`'s study.

    A black band with "AI OUTPUT - UNREVIEWED - <finding> p=<probability>" is added above the
    image (not over it: the overlay's own pixels are all kept), so the output is taller.
    """
    if overlay_rgb.ndim != 3 or overlay_rgb.shape[2] != 3 or overlay_rgb.dtype != np.uint8:
        raise ValueError("overlay_rgb must be an (H, W, 3) uint8 array")
    if overlay_rgb.shape[0] < 1 or overlay_rgb.shape[1] < 1:
        raise ValueError("overlay_rgb is empty")
    (image,) = _study_images([source])
    p = _unit_interval(finding.probability, f"probability of {finding.label!r}")
    label = f"AI OUTPUT - UNREVIEWED - {finding.display} p={p:.2f}"
    if finding.positive is None:
        label += " - NO CALL"
    pixels = burn_label(overlay_rgb, label)
    orientation = _orientation(image)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_placeholder(image),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=_series_uid(image, series_number),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=algorithm.manufacturer,
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description="AI heatmap (unreviewed)",
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        device_serial_number=_serial_number(algorithm),
        specific_character_set=UTF8,
    )
    if orientation is None:  # Type 2: unknown stays empty rather than guessed
        sc.PatientOrientation = []
    sc.copy_patient_and_study_information(image)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = (
        f"AI heatmap (unreviewed): {UNREVIEWED} {finding.display} p={p:.2f}, "
        f"threshold {finding.threshold:.2f}; model {algorithm.name} {algorithm.version}."
    )
    sc.DerivationDescription = "AI heat map composed over the source image; text band added"
    ref = Dataset()
    ref.ReferencedSOPClassUID = image.SOPClassUID
    ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.ReferencedImageSequence = [copy.deepcopy(ref)]
    log.info("heat-map secondary capture made: %dx%d", pixels.shape[1], pixels.shape[0])
    return sc


def burn_label(rgb: np.ndarray, text: str) -> np.ndarray:
    """`rgb` with a black band above it holding `text` in white (Pillow's default font)."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = rgb.shape[:2]
    pad = max(2, width // 200)
    size = max(8, min(height // 20, 48))
    while True:  # the largest font (down to 6 px) whose line fits the width
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = font.getbbox(text)
        if right - left <= width - 2 * pad or size <= 6:
            break
        size -= 1
    band = (bottom - top) + 2 * pad
    canvas = Image.new("RGB", (width, height + band), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb, "RGB"), (0, band))
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()


# --------------------------------------------------------------------------- helpers


def _measurement_report(
    context: hd.sr.ObservationContext,
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations],
    images: list[Dataset],
    statements: list[hd.sr.TextContentItem],
) -> hd.sr.MeasurementReport:
    """TID 1500 with our own image library (TID 1600) and a root "Qualitative Evaluations"
    container holding the free-text statements."""
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=CHEST_IMAGING,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    root = report[0].ContentSequence
    at = next(i for i, item in enumerate(root) if _concept(item) == ("126010", "DCM"))
    root.insert(at, _image_library(images))
    evaluations = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(statements)
    root.append(evaluations)
    return report


def _image_library(images: list[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600: one entry per source image. highdicom's ImageLibrary needs attributes that
    plain CR/DX headers often lack (ImagerPixelSpacing), so the descriptors are optional here."""
    entries = []
    for ds in images:
        entry = hd.sr.ImageContentItem(
            name=hd.sr.CodedConcept("260753009", "SCT", "Source"),
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        entry.ContentSequence = hd.sr.ContentSequence(_descriptors(ds))
        entries.append(entry)
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence(entries)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _descriptors(ds: Dataset) -> list[hd.sr.ContentItem]:
    acq = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    pixels = hd.sr.CodedConcept("{pixels}", "UCUM", "Pixels")
    out: list[hd.sr.ContentItem] = []
    modality = _MODALITIES.get(str(ds.get("Modality") or ""))
    if modality is not None:  # CID 29 "Acquisition Modality"
        out.append(
            hd.sr.CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=acq)
        )
    for name, keyword in (
        (codes.DCM.PixelDataRows, "Rows"),
        (codes.DCM.PixelDataColumns, "Columns"),
    ):
        if ds.get(keyword):
            out.append(
                hd.sr.NumContentItem(
                    name=name, value=int(ds[keyword].value), unit=pixels, relationship_type=acq
                )
            )
    return out


def _study_images(sources: Sequence[Dataset]) -> list[Dataset]:
    """Header-only copies of the sources (one study, distinct SOP Instance UIDs)."""
    if not sources:
        raise ValueError("no source images")
    seen: dict[str, Dataset] = {}
    for ds in sources:
        for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not ds.get(keyword):
                raise ValueError(f"a source image lacks {keyword}")
        seen.setdefault(str(ds.SOPInstanceUID), ds)
    studies = {str(ds.StudyInstanceUID) for ds in seen.values()}
    if len(studies) != 1:
        raise ValueError("the source images belong to more than one study")
    return [_header(ds) for ds in seen.values()]


def _header(ds: Dataset) -> Dataset:
    """A deep copy of `ds` without pixel data (group 7FE0) and overlays (60xx)."""
    out = Dataset()
    for elem in ds:
        group = elem.tag.group
        if group == 0x7FE0 or (group & 0xFF00) == 0x6000:
            continue
        out.add(copy.deepcopy(elem))
    return out


# Patient and study attributes highdicom reads from its reference dataset and validates.
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _placeholder(image: Dataset) -> Dataset:
    """`image` with its patient/study values blanked for highdicom's constructors, so they
    never reach its validators or warnings. The real values are then copied verbatim."""
    out = copy.deepcopy(image)  # a Dataset copy shares its elements: setattr would write through
    for keyword in _TYPE2:
        setattr(out, keyword, None)
    return out


def _serial_number(algorithm: AlgorithmInfo) -> str | None:
    """General Equipment's Device Serial Number (LO, 64 chars): the model file's sha256."""
    return algorithm.model_sha256 if 0 < len(algorithm.model_sha256) <= 64 else None


def _device_uid(algorithm: AlgorithmInfo) -> str:
    """A stable Device Observer UID per model file."""
    return generate_uid(entropy_srcs=["diagnostics model", algorithm.model_sha256])


def _series_uid(image: Dataset, series_number: int) -> str:
    """One series per (study, series number): re-runs add instances, not series."""
    return generate_uid(
        entropy_srcs=[str(image.StudyInstanceUID), "diagnostics", str(series_number)]
    )


def _source_image(ds: Dataset) -> hd.sr.SourceImageForMeasurementGroup:
    return hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=ds.SOPClassUID, referenced_sop_instance_uid=ds.SOPInstanceUID
    )


def _text(name: hd.sr.CodedConcept | Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _concept(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    return str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", ""))


def _unit_interval(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value!r}")
    return value


def _person_name(name: str) -> str:
    """A staff user name as a DICOM PN: one family-name component unless already PN-shaped."""
    name = re.sub(r"[\\=\r\n]", " ", name.strip())[:64]
    return name if "^" in name else f"{name}^"


def _orientation(image: Dataset) -> tuple[str, str] | None:
    value = image.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, col = str(value[0]), str(value[1])
    return (row, col) if {row, col} <= set("APLRHF") and row and col else None


__all__ = [
    "AlgorithmInfo",
    "ReportFinding",
    "ReviewDecision",
    "ai_report",
    "burn_label",
    "finding_code",
    "heatmap_capture",
    "review_report",
]
