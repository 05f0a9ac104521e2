"""DICOM result objects (serve/dicom/results.py): the AI's TID 1500 Comprehensive SR, the
clinician's review SR and the heat-map Secondary Capture, written as Part 10 files, read back
with pydicom and highdicom, and checked by dcmtk (dsrdump, dcmdump) where it is installed."""

from __future__ import annotations

import copy
import io
import logging
import shutil
import subprocess
import warnings
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import shared
from highdicom._standard_utils import get_module_attribute_map
from pydicom import Dataset
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from pydicom.valuerep import DT
from service_support import dicom_bytes, synth_pixels

from diagnostics.serve.dicom.results import (
    SCHEME,
    UNREVIEWED,
    AlgorithmInfo,
    ReportFinding,
    ReviewDecision,
    ai_report,
    heatmap_capture,
    review_report,
)

ALGORITHM = AlgorithmInfo(name="cxr-demo", version="7", model_sha256="0123456789abcdef" * 4)
POPULATION = "inside the intended population (age 7 y from DICOM)"
PRESENT, ABSENT, UNDETERMINED = "52101004", "272519000", "373068000"  # CID 240, SCT


def _header(pixels: np.ndarray, **changes: object) -> Dataset:
    """A synthetic CR image as the service reads it: header only."""
    data = dicom_bytes(pixels, **changes)
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


@pytest.fixture(scope="module")
def study() -> list[Dataset]:
    """A two-image study (same StudyInstanceUID, distinct SOP Instance UIDs)."""
    first, second = synth_pixels(2, size=32)
    a = _header(first, PatientBirthDate="20180301", PatientSex="F", PatientAge="007Y")
    b = _header(second, PatientBirthDate="20180301", PatientSex="F", PatientAge="007Y")
    b.StudyInstanceUID = a.StudyInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    return [a, b]


def _findings(study: list[Dataset]) -> list[ReportFinding]:
    return [
        ReportFinding("pneumonia", "Pneumonia", 0.87, 0.5, True, (study[0].SOPInstanceUID,)),
        ReportFinding("Effusion", "Pleural effusion", 0.12, 0.4, False),
        ReportFinding("Tuberculosis", "Tuberculosis", 0.33, 0.6, None),
    ]


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _items(seq: object) -> list[Dataset]:
    """Every content item of an SR tree, depth first."""
    out: list[Dataset] = []
    for item in seq or []:
        out.append(item)
        out.extend(_items(item.get("ContentSequence")))
    return out


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def _texts(ds: Dataset) -> list[str]:
    return [str(i.TextValue) for i in _items(ds.ContentSequence) if i.ValueType == "TEXT"]


def _groups(path: Path) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    report = hd.sr.srread(path).content
    return {g.tracking_identifier: g for g in report.get_image_measurement_groups()}


def _value(group: hd.sr.MeasurementsAndQualitativeEvaluations, meaning: str) -> float:
    (m,) = [m for m in group.get_measurements() if m.name.meaning == meaning]
    return float(m.value)


# Patient attributes: group 0010 and every root attribute of the Patient / Patient Study modules.
_MODULES = get_module_attribute_map()
_PATIENT = {
    str(i["keyword"])
    for key in ("patient", "patient-study")
    for i in _MODULES[key]
    if not i["path"]
}


def _assert_patient_from_source(out: Dataset, src: Dataset) -> None:
    """Every patient attribute of `out` is the source's; one the source lacks stays empty
    (the IOD's Type 2 placeholders) and carries nothing."""
    for elem in out:
        if elem.tag.group != 0x0010 and elem.keyword not in _PATIENT:
            continue
        if elem.VR == "SQ" or elem.value not in (None, "", b""):
            assert elem.tag in src, f"{elem.keyword} is not in the source"
            assert elem.value == src[elem.tag].value, elem.keyword
        else:
            assert src.get(elem.tag) is None or src[elem.tag].value in (None, ""), elem.keyword
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        if src.get(keyword):
            assert out[keyword].value == src[keyword].value, keyword


def _dcmtk(tool: str, path: Path, *args: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"dcmtk's {tool} is not installed: no second toolkit checks the file")
    run = subprocess.run(
        [exe, *args, str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


# --------------------------------------------------------------------------- AI report


def test_ai_report_two_image_study(study: list[Dataset], tmp_path: Path) -> None:
    findings = _findings(study)
    sr = ai_report(study, findings, ALGORITHM, population=POPULATION, study_ref="9f3ab2")
    path = _write(sr, tmp_path / "ai.dcm")
    ds = pydicom.dcmread(path)

    assert ds.SOPClassUID == ComprehensiveSRStorage and ds.Modality == "SR"
    assert ds.file_meta.MediaStorageSOPClassUID == ComprehensiveSRStorage
    template = ds.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")
    assert (ds.CompletionFlag, ds.VerificationFlag) == ("PARTIAL", "UNVERIFIED")
    assert ds.PreliminaryFlag == "PRELIMINARY"
    assert ds.SeriesDescription == "AI result (unreviewed)"
    assert ds.StudyInstanceUID == study[0].StudyInstanceUID
    assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in study}
    assert SCHEME in {i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence}

    # The algorithm: device observer (TID 1004) and General Equipment.
    items = _items(ds.ContentSequence)
    serial = [i.TextValue for i in items if _concept(i) == ("121016", "DCM")]
    assert serial == [ALGORITHM.model_sha256]
    assert [i.TextValue for i in items if _concept(i) == ("121013", "DCM")] == ["cxr-demo"]
    versions = {i.TextValue for i in items if _concept(i) == ("111003", "DCM")}
    assert versions == {"7"}
    assert (ds.SoftwareVersions, ds.DeviceSerialNumber) == ("7", ALGORITHM.model_sha256)

    # The image library lists every source image; the evidence too.
    library = [i for i in items if _concept(i) == ("111028", "DCM")]  # Image Library
    refs = [
        (r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID)
        for i in _items(library[0].ContentSequence)
        if i.ValueType == "IMAGE"
        for r in i.ReferencedSOPSequence
    ]
    assert sorted(refs) == sorted((s.SOPClassUID, s.SOPInstanceUID) for s in study)
    evidence = {uid for _, _, uid, _ in hd.sr.srread(path).get_evidence()}
    assert evidence == {s.SOPInstanceUID for s in study}

    # One TID 1501 group per finding: the call, the probability, the threshold, the images.
    groups = _groups(path)
    assert set(groups) == {f.label for f in findings}
    calls = {"pneumonia": PRESENT, "Effusion": ABSENT, "Tuberculosis": UNDETERMINED}
    for f in findings:
        g = groups[f.label]
        (evaluation,) = g.get_qualitative_evaluations()
        assert evaluation.value.value == calls[f.label]
        assert evaluation.name == g.finding_type
        assert _value(g, "Calibrated probability of finding") == pytest.approx(f.probability)
        assert _value(g, "Decision threshold (operating point)") == pytest.approx(f.threshold)
        unit = g.get_measurements()[0].unit
        assert (unit.value, unit.scheme_designator) == ("1", "UCUM")
        images = {s.referenced_sop_instance_uid for s in g.source_images}
        wanted = set(f.image_uids) or {s.SOPInstanceUID for s in study}
        assert images == wanted
    pneumonia = groups["pneumonia"].finding_type
    assert (pneumonia.value, pneumonia.scheme_designator) == ("233604007", "SCT")
    assert groups["Tuberculosis"].finding_type.scheme_designator == SCHEME

    texts = _texts(ds)
    assert UNREVIEWED in texts and POPULATION in texts and "9f3ab2" in texts
    no_call = [t for t in texts if t.startswith("No call made")]
    assert len(no_call) == 1 and POPULATION in no_call[0]
    _assert_patient_from_source(ds, study[0])
    assert ds.PatientAge == "007Y"


def test_ai_report_adds_no_patient_data_and_leaks_no_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A source without birth date or sex: the SR's Type 2 attributes stay empty. A name
    without a caret (which highdicom would warn about, quoting it) never reaches a warning or
    a log record."""
    (pixels,) = synth_pixels(1, seed=5, size=32)
    src = _header(pixels, PatientName="Nguyen Van Anh")
    assert "PatientBirthDate" not in src and "PatientSex" not in src
    finding = ReportFinding("pneumonia", "Pneumonia", 0.4, 0.5, False)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        sr = ai_report([src], [finding], ALGORITHM, population=POPULATION)
        capture = heatmap_capture(src, np.zeros((16, 64, 3), np.uint8), finding, ALGORITHM)
    said = [str(w.message) for w in warned] + [r.getMessage() for r in caplog.records]
    assert not [s for s in said if "Nguyen" in s]
    for out in (sr, capture):
        ds = pydicom.dcmread(_write(out, tmp_path / "out.dcm"))
        assert ds.PatientName == "Nguyen Van Anh"
        assert ds.PatientBirthDate in (None, "") and ds.PatientSex in (None, "")
        _assert_patient_from_source(ds, src)


def test_ai_report_real_cr_image(tmp_path: Path) -> None:
    """A real CR chest (ISO_IR 100 header, with accession number, birth date, sex...)."""
    src = pydicom.dcmread(shared("dicom", "pydicom-data_RG1_UNCR.dcm"), stop_before_pixels=True)
    finding = ReportFinding("Cardiomegaly", "Cardiomegaly", 0.71, 0.55, True)
    sr = ai_report([src], [finding], ALGORITHM, population="adult (age from DICOM)")
    ds = pydicom.dcmread(_write(sr, tmp_path / "real.dcm"))
    _assert_patient_from_source(ds, src)
    assert str(ds.PatientName) == "CompressedSamples^RG1" and ds.PatientSex == "F"
    assert (ds.AccessionNumber, ds.StudyID) == (src.AccessionNumber, src.StudyID)
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    (group,) = _groups(tmp_path / "real.dcm").values()
    assert group.get_qualitative_evaluations()[0].value.value == PRESENT
    assert [s.referenced_sop_instance_uid for s in group.source_images] == [src.SOPInstanceUID]
    out = _dcmtk("dsrdump", tmp_path / "real.dcm", "+Pl")
    assert "Cardiomegaly" in out and UNREVIEWED in out


# --------------------------------------------------------------------------- review report


def test_review_report_verifies_and_references_the_ai_sr(
    study: list[Dataset], tmp_path: Path
) -> None:
    ai = pydicom.dcmread(
        _write(
            ai_report(study, _findings(study), ALGORITHM, population=POPULATION), tmp_path / "a.dcm"
        )
    )
    before = copy.deepcopy(ai)
    signed = datetime(2025, 3, 4, 10, 30, tzinfo=UTC)
    decisions = [
        ReviewDecision("pneumonia", "Pneumonia", "agree"),
        ReviewDecision("Effusion", "Pleural effusion", "corrected", "Atelectasis", "plate-like"),
        ReviewDecision("Tuberculosis", "Tuberculosis", "disagree"),
        ReviewDecision("Fracture", "Fracture", "unlisted", "Fracture", "left 6th rib"),
    ]
    review = review_report(ai, study, decisions, reviewer="dr.lan", signed_at=signed)
    path = _write(review, tmp_path / "r1.dcm")
    ds = pydicom.dcmread(path)
    assert ai == before  # never modified

    assert ds.SOPClassUID == ComprehensiveSRStorage
    assert ds.SOPInstanceUID != ai.SOPInstanceUID
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (ds.CompletionFlag, ds.VerificationFlag) == ("COMPLETE", "VERIFIED")
    assert "Reviewed by a clinician" in ds.SeriesDescription
    (observer,) = ds.VerifyingObserverSequence
    assert str(observer.VerifyingObserverName) == "dr.lan^"
    assert str(observer.VerificationDateTime) == str(DT(signed)) == "20250304103000+0000"
    (predecessor,) = ds.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == ai.StudyInstanceUID
    (series,) = predecessor.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ai.SeriesInstanceUID
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence] == [ai.SOPInstanceUID]
    _assert_patient_from_source(ds, study[0])

    groups = _groups(path)
    ai_groups = _groups(tmp_path / "a.dcm")
    verdicts = {
        label: {e.name.meaning: e.value.value for e in g.get_qualitative_evaluations()}
        for label, g in groups.items()
    }
    decision = "Clinician decision on AI result"
    assert verdicts["pneumonia"] == {decision: "AGREE"}
    assert verdicts["Effusion"] == {decision: "CORRECTED", "Corrected finding": "Atelectasis"}
    assert verdicts["Tuberculosis"] == {decision: "DISAGREE"}
    assert verdicts["Fracture"] == {decision: "UNLISTED"}
    for label in ("pneumonia", "Effusion", "Tuberculosis"):  # tracked across both reports
        assert groups[label].tracking_uid == ai_groups[label].tracking_uid
    texts = _texts(ds)
    assert "plate-like" in texts and "left 6th rib" in texts
    assert any(t.startswith("Reviewed by a clinician (dr.lan") for t in texts)

    # A later re-sign lists the AI SR and the first review as predecessors.
    first = pydicom.dcmread(path)
    again = review_report(
        ai,
        study,
        decisions[:1],
        reviewer="dr.lan",
        signed_at=signed,
        instance_number=2,
        previous=[first],
    )
    again = pydicom.dcmread(_write(again, tmp_path / "r2.dcm"))
    referenced = {
        r.ReferencedSOPInstanceUID
        for p in again.PredecessorDocumentsSequence
        for s in p.ReferencedSeriesSequence
        for r in s.ReferencedSOPSequence
    }
    assert referenced == {ai.SOPInstanceUID, first.SOPInstanceUID}
    assert again.SeriesInstanceUID == first.SeriesInstanceUID  # one review series per study


# --------------------------------------------------------------------------- heat map


def _overlay(height: int, width: int) -> np.ndarray:
    """A grey chest-like ramp with a red blob: what the service composes."""
    yy, xx = np.mgrid[0:height, 0:width]
    grey = (40 + 150 * xx / max(width - 1, 1)).astype(np.uint8)
    rgb = np.stack([grey, grey, grey], axis=-1)
    blob = (yy - height / 2) ** 2 + (xx - width / 3) ** 2 < (min(height, width) / 5) ** 2
    rgb[blob] = (230, 40, 30)
    return rgb


@pytest.mark.parametrize("real", [False, True], ids=["synthetic", "real-cr"])
def test_heatmap_capture(study: list[Dataset], tmp_path: Path, real: bool) -> None:
    if real:
        src = pydicom.dcmread(shared("dicom", "pydicom-data_RG1_UNCR.dcm"), stop_before_pixels=True)
    else:
        src = study[0]
    overlay = _overlay(120, 160)
    finding = ReportFinding("pneumonia", "Pneumonia", 0.87, 0.5, True)
    sc = heatmap_capture(src, overlay, finding, ALGORITHM)
    path = _write(sc, tmp_path / "sc.dcm")
    ds = pydicom.dcmread(path)

    assert ds.SOPClassUID == SecondaryCaptureImageStorage and ds.Modality == "OT"
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel) == ("RGB", 3)
    assert ds.BurnedInAnnotation == "YES"
    assert ds.SeriesDescription == "AI heatmap (unreviewed)"
    assert "AI heatmap (unreviewed)" in ds.ImageComments and "p=0.87" in ds.ImageComments
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    (ref,) = ds.SourceImageSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        src.SOPClassUID,
        src.SOPInstanceUID,
    )
    _assert_patient_from_source(ds, src)
    if real:
        assert list(ds.PatientOrientation) == ["L", "F"]

    pixels = ds.pixel_array
    band = pixels.shape[0] - overlay.shape[0]
    assert band > 0 and pixels.shape[1:] == overlay.shape[1:]
    assert np.array_equal(pixels[band:], overlay)  # the overlay itself is untouched
    top = pixels[:band]
    assert (top == 0).all(axis=-1).mean() > 0.5  # a black band...
    assert (top > 200).all(axis=-1).sum() > 30  # ...with white text drawn in it
    assert not np.array_equal(top, overlay[:band])
    assert hd.imread(path).get_frame(1).shape == pixels.shape
    _dcmtk("dcmdump", path)


# --------------------------------------------------------------------------- dcmtk


def test_dsrdump_reads_both_reports(study: list[Dataset], tmp_path: Path) -> None:
    """dcmtk parses both SRs without its error-tolerance options and prints every finding."""
    findings = _findings(study)
    ai = ai_report(study, findings, ALGORITHM, population=POPULATION)
    ai_path = _write(ai, tmp_path / "ai.dcm")
    out = _dcmtk("dsrdump", ai_path, "+Pl", "+Pt")
    assert "TID 1500" in out and "PARTIAL" in out and "UNVERIFIED" in out
    for f in findings:
        assert f.display in out
    assert UNREVIEWED in out

    decisions = [ReviewDecision(f.label, f.display, "agree") for f in findings]
    review = review_report(
        pydicom.dcmread(ai_path), study, decisions, reviewer="dr.lan", signed_at=datetime.now(UTC)
    )
    out = _dcmtk("dsrdump", _write(review, tmp_path / "review.dcm"), "+Pl")
    assert "VERIFIED" in out and "COMPLETE" in out and "Predecessor Docs" in out
    assert "Agrees with AI result" in out


# --------------------------------------------------------------------------- refusals


def test_refuses_what_it_cannot_report_truthfully(study: list[Dataset]) -> None:
    (pixels,) = synth_pixels(1, seed=9, size=32)
    other = _header(pixels)  # another study
    ok = ReportFinding("pneumonia", "Pneumonia", 0.5, 0.5, True)
    with pytest.raises(ValueError, match="more than one study"):
        ai_report([study[0], other], [ok], ALGORITHM, population=POPULATION)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bad = ReportFinding("pneumonia", "Pneumonia", float("nan"), 0.5, True)
        ai_report(study, [bad], ALGORITHM, population=POPULATION)
    with pytest.raises(ValueError, match="not among the sources"):
        stray = ReportFinding("pneumonia", "Pneumonia", 0.5, 0.5, True, ("1.2.3.4",))
        ai_report(study, [stray], ALGORITHM, population=POPULATION)
    with pytest.raises(ValueError, match="at least one finding"):
        ai_report(study, [], ALGORITHM, population=POPULATION)
    ai = ai_report(study, [ok], ALGORITHM, population=POPULATION)
    now = datetime.now(UTC)
    with pytest.raises(ValueError, match="unknown verdict"):
        review_report(
            ai, study, [ReviewDecision("pneumonia", "P", "maybe")], reviewer="x", signed_at=now
        )
    with pytest.raises(ValueError, match="corrected label"):
        review_report(
            ai, study, [ReviewDecision("pneumonia", "P", "corrected")], reviewer="x", signed_at=now
        )
    with pytest.raises(ValueError, match="sources' study"):
        review_report(
            ai, [other], [ReviewDecision("pneumonia", "P", "agree")], reviewer="x", signed_at=now
        )
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        heatmap_capture(study[0], np.zeros((8, 8), np.uint8), ok, ALGORITHM)
