"""The intended population: the age from DICOM, the model's own population check, refusing or
flagging at the clinic, and evaluation that counts what it withholds. Synthetic data and a real
exported model (`population_model`: standard-habitus chests inside, broad-habitus outside)."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from service_support import dicom_bytes, png_bytes

from diagnostics.imaging import parse_age_string, parse_dicom_date, patient_age
from diagnostics.serve.qc import OUTSIDE_POPULATION, QCConfig
from diagnostics.serve.runner import OnnxModel, Scorer


def _pixels(n: int, seed: int, habitus: str = "standard") -> list[np.ndarray]:
    from diagnostics.data.synthetic import SynthSpec, generate

    return [img.pixels for _, img, _ in generate(n, SynthSpec(size=64), seed, habitus)]


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("045Y", 45.0),
        ("003Y", 3.0),
        ("018M", 1.5),
        ("006W", 42 / 365.2425),
        ("010D", 10 / 365.2425),
        (" 005Y ", 5.0),
        ("000D", 0.0),
    ],
)
def test_age_strings(text, years):
    assert parse_age_string(text) == pytest.approx(years)


@pytest.mark.parametrize("text", ["45Y", "045", "4a5Y", "045y5", "-05Y", "", None, "0045Y", "1.5Y"])
def test_malformed_age_strings_are_unknown(text):
    assert parse_age_string(text) is None


def test_age_from_dates_and_its_refusals():
    ds = pydicom.Dataset()
    ds.PatientBirthDate, ds.StudyDate = "20200115", "20230114"
    age, source = patient_age(ds)
    assert 2.99 < age < 3.0 and source == "StudyDate-PatientBirthDate"
    ds.PatientAge = "004Y"  # the age tag comes first
    assert patient_age(ds) == (4.0, "PatientAge")
    del ds.PatientAge
    ds.StudyDate = "20190101"  # born after the study: impossible, so unknown
    assert patient_age(ds) == (None, None)
    assert parse_dicom_date("2023-01-14") is None and parse_dicom_date("20230230") is None
    assert patient_age(pydicom.Dataset()) == (None, None)


def test_metadata_card_and_measured_check(population_model):
    m = OnnxModel(population_model)
    pop = m.metadata.population
    assert pop.age_years == (1, 6) and pop.age_text() == "1 to 5 years"
    assert pop.check is not None and m.population_output == "population"
    metrics = pop.check.metrics
    # measured on held-out broad-habitus images and the validation split
    assert metrics["auroc"] > 0.95 and metrics["outside_refused"] > 0.9
    assert metrics["inside_val_refused"] <= 0.02 and "2.0%" in pop.check.rule
    run = population_model.parent
    doc = json.loads((run / "metrics.json").read_text())["population"]
    assert doc["threshold"] == pytest.approx(pop.check.threshold)
    assert set(doc["ood_distance_on_same_images"]) == {
        "auroc",
        "outside_refused",
        "inside_val_refused",
    }
    card = (run / "model_card.md").read_text()
    assert "## Intended population" in card and "1 to 5 years" in card
    assert m.describe()["population"]["ages"] == "1 to 5 years"


@pytest.fixture(scope="module")
def scorer(population_model) -> Scorer:
    return Scorer(OnnxModel(population_model), QCConfig(ood=False))


@pytest.mark.parametrize(
    ("age", "status"),
    [("045Y", "failed_qc"), ("003Y", "scored"), ("018M", "scored"), ("011M", "failed_qc")],
)
def test_dicom_age_decides_before_any_score(scorer, age, status):
    r = scorer.score(dicom_bytes(_pixels(1, 500)[0], PatientAge=age))
    assert r.status == status, r.message
    assert r.population["evidence"] == "age"
    if status == "failed_qc":
        assert r.code == OUTSIDE_POPULATION and not r.findings
        assert "outside the ages the model was made for (1 to 5 years)" in r.message
        assert "timing_ms" not in r.as_dict() or "model" not in r.timing_ms  # never ran
    else:
        assert r.findings and all(f.positive is not None for f in r.findings)


def test_birth_date_is_used_when_no_age_tag(scorer):
    data = dicom_bytes(_pixels(1, 501)[0], PatientBirthDate="19800101", StudyDate="20250601")
    r = scorer.score(data)
    assert (
        r.code == OUTSIDE_POPULATION and r.population["age_source"] == "StudyDate-PatientBirthDate"
    )
    assert "45 years" in r.message and "19800101" not in json.dumps(r.as_dict())


def test_known_age_beats_the_check_and_says_so(scorer):
    r = scorer.score(dicom_bytes(_pixels(1, 502, "broad")[0], PatientAge="003Y"))
    assert r.status == "scored"
    notes = [q for q in r.qc if q.code == "population_check"]
    assert notes and "the age in the file decided" in notes[0].message


def test_no_age_the_check_decides(scorer):
    inside = [scorer.score(png_bytes(p)) for p in _pixels(6, 503)]
    assert sum(r.status == "scored" for r in inside) >= 5
    outside = [scorer.score(png_bytes(p)) for p in _pixels(6, 504, "broad")]
    assert all(r.code == OUTSIDE_POPULATION for r in outside)
    assert all(r.population["evidence"] == "check" for r in outside)
    assert "No age was given" in outside[0].message
    # a malformed age is unknown, never an error: the check decides
    r = scorer.score(dicom_bytes(_pixels(1, 504, "broad")[0], PatientAge="4a5Y"))
    assert r.code == OUTSIDE_POPULATION and r.population["evidence"] == "check"


def test_flag_mode_scores_without_a_call(population_model):
    flagging = Scorer(OnnxModel(population_model), QCConfig(ood=False, population="flag"))
    r = flagging.score(dicom_bytes(_pixels(1, 505)[0], PatientAge="045Y"))
    assert r.status == "scored" and r.flags == [OUTSIDE_POPULATION]
    assert r.findings and all(f.positive is None and f.heatmap is None for f in r.findings)
    assert "scored with a flag" in r.message
    doc = r.as_dict()
    assert doc["flags"] == [OUTSIDE_POPULATION] and doc["population"]["inside"] is False


def test_a_sites_own_population_limit(scorer):
    inside, outside = png_bytes(_pixels(1, 506)[0]), png_bytes(_pixels(1, 506, "broad")[0])
    strict, lax = scorer.score_many([inside, outside], population_limits=[1e9, -1e9])
    assert strict.code == OUTSIDE_POPULATION  # the site's limit, not the model's
    assert lax.status == "scored" and lax.population["check_limit"] == -1e9


def test_evaluate_counts_what_the_clinic_withholds(population_model, tmp_path):
    """An AUROC over out-of-population images is never produced by accident."""
    import pandas as pd

    from diagnostics.data.config import parse_dataset_config
    from diagnostics.train.evaluate import evaluate, render_report

    rows = []
    for i, (pixels, habitus) in enumerate(
        [(p, "standard") for p in _pixels(12, 507)]
        + [(p, "broad") for p in _pixels(8, 508, "broad")]
    ):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(pixels))
        rows.append({"path": f"{i}.png", "Pneumonia": i % 2, "habitus": habitus})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    data = parse_dataset_config(
        {
            "source": "manifest",
            "labels_file": str(tmp_path / "m.csv"),
            "split": {"fractions": {"test": 1.0}},
        }
    )
    checked = evaluate(population_model, data, split="test", n_boot=0, progress=False)
    qc = checked["qc"]
    assert qc["applied"] and qc["images"] == 20
    # the broad-habitus images are withheld: by the OOD distance or the population check
    assert qc["withheld"] >= 8
    assert set(qc["withheld_by_reason"]) <= {OUTSIDE_POPULATION, "out_of_distribution"}
    assert checked["findings"]["Pneumonia"]["n"] == qc["scored_with_a_call"] <= 12
    assert "would score with a call" in render_report(checked)
    unchecked = evaluate(
        population_model, data, split="test", n_boot=0, progress=False, population_check=False
    )
    assert unchecked["findings"]["Pneumonia"]["n"] == 20
    assert "WARNING: population check OFF" in render_report(unchecked)


def test_a_check_the_graph_lacks_is_refused_at_load(cxr_model, tmp_path):
    """Metadata naming a population output that is not in the graph: the file is refused,
    never silently run without the check."""
    import onnx

    from diagnostics.contract import METADATA_KEY, ModelMetadata, Population, PopulationCheck
    from diagnostics.serve.runner import ModelIntegrityError

    proto = onnx.load(str(cxr_model))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    meta = ModelMetadata.from_json(entry.value)
    check = PopulationCheck(threshold=0.0, rule="test")
    entry.value = meta.model_copy(update={"population": Population(check=check)}).to_json()
    altered = tmp_path / "altered.onnx"
    onnx.save(proto, str(altered))
    with pytest.raises(ModelIntegrityError, match="population"):
        OnnxModel(altered)


def test_resume_refuses_another_population_or_weight_averaging(population_model):
    import yaml

    from diagnostics.train.config import CXRTrainConfig
    from diagnostics.train.cxr import _check_resumable

    run_dir = population_model.parent
    saved = CXRTrainConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    _check_resumable(run_dir, saved)  # the same config resumes
    with pytest.raises(ValueError, match="'population' config differs"):
        _check_resumable(run_dir, saved.model_copy(update={"population": None}))
    other = saved.model_copy(deep=True)
    other.train.ema_decay = 0.99
    with pytest.raises(ValueError, match=r"train\.ema_decay"):
        _check_resumable(run_dir, other)


def test_withheld_images_are_counted_once():
    """An image flagged by its age and then refused by another check is one withheld image."""
    from diagnostics.train.evaluate import qc_summary

    verdicts = [
        {"status": "failed_qc", "code": "out_of_distribution", "flags": [OUTSIDE_POPULATION]},
        {"status": "scored", "code": None, "flags": [OUTSIDE_POPULATION]},
        {"status": "scored", "code": None, "flags": []},
    ]
    qc = qc_summary(verdicts, True)
    assert qc["withheld"] == 2 and qc["scored_with_a_call"] == 1
    assert qc["withheld_by_reason"] == {"out_of_distribution": 1, OUTSIDE_POPULATION: 1}
