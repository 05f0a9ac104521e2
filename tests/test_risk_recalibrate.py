"""Per-site recalibration of a risk model: the logistic fit, the serving map, the site profile
(`models recalibrate --table`), and the OUCRU dengue model recalibrated at a held-out hospital."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from diagnostics.serve.risk import RiskModel, recalibrate_probability
from diagnostics.train.recalibrate import SampleTooSmall
from diagnostics.train.recalibrate_risk import (
    fit_logistic_recalibration,
    fit_risk_recalibration,
    recalibrate_risk,
)
from tests.conftest import REPO, diagnostics_home, shared

DENGUE = REPO / "configs/risk/dengue_vn_cbc.yaml"


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _miscalibrated(n: int, slope: float, shift: float, seed: int = 0):
    """Outcomes drawn from true risks, and a model whose logit is (true logit - shift) / slope:
    the recalibration that mends it is a = slope, b = shift."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-0.5, 1.5, n)  # true logit
    y = (rng.random(n) < _sigmoid(z)).astype(float)
    return _sigmoid((z - shift) / slope), y


# --------------------------------------------------------------------------- the fit and the map


def test_a_known_slope_and_shift_are_recovered():
    p, y = _miscalibrated(20000, slope=0.6, shift=0.8)
    a, b = fit_logistic_recalibration(p, y)
    assert a == pytest.approx(0.6, abs=0.03) and b == pytest.approx(0.8, abs=0.06)
    p, y = p[:4000], y[:4000]  # (the threshold search is quadratic in distinct scores)
    a, b = fit_logistic_recalibration(p, y)
    fit = fit_risk_recalibration(p, y, label="dengue", model_threshold=0.5, policy="youden")
    assert fit["temperature"] == pytest.approx(1 / a) and fit["intercept"] == pytest.approx(b)
    ev = fit["evidence"]
    assert ev["n"] == 4000 and ev["positives"] == int(y.sum()) and ev["policy"] == "youden"
    # before: too low on average (intercept > 0) and too extreme (slope < 1); after: mended
    assert ev["before"]["calibration_intercept"] > 0.5
    assert ev["before"]["calibration_slope"] == pytest.approx(0.6, abs=0.08)
    assert abs(ev["after"]["calibration_intercept"]) < 1e-6
    assert ev["after"]["calibration_slope"] == pytest.approx(1.0, abs=1e-4)
    # the site's probability is the serving map of the model's own, and keeps its ranking
    p_site = recalibrate_probability(p, fit["temperature"], fit["intercept"])
    assert np.all(np.diff(p_site[np.argsort(p)]) >= 0)
    # youden on p_site: a real trade-off at the site, better than the model's 0.5 here
    b4, after = ev["before"], ev["after"]
    assert after["sensitivity"] + after["specificity"] >= b4["sensitivity"] + b4["specificity"]


def test_the_map_is_the_stated_formula():
    p = np.array([0.0, 1e-9, 0.2, 0.5, 0.9, 1.0, np.nan])
    out = recalibrate_probability(p, 2.0, -0.5)
    q = np.clip(p[:-1], 1e-6, 1 - 1e-6)
    assert out[:-1] == pytest.approx(_sigmoid(_logit(q) / 2.0 - 0.5), rel=1e-12)
    assert np.isnan(out[-1])  # unknown stays unknown
    assert recalibrate_probability(p[2:5], 1.0, 0.0) == pytest.approx(p[2:5], rel=1e-12)
    with pytest.raises(ValueError, match="temperature > 0"):
        recalibrate_probability(p, 0.0, 0.0)


def test_a_model_that_ranks_backwards_is_refused():
    p, y = _miscalibrated(2000, slope=-0.8, shift=0.0)  # logit falls as the true risk rises
    with pytest.raises(ValueError, match=r"calibration slope at this site is -.*<= 0"):
        fit_risk_recalibration(p, y, label="dengue", model_threshold=0.5, policy="youden")


def test_too_few_cases_and_bad_inputs_are_refused():
    p, y = _miscalibrated(200, slope=1.0, shift=0.0)
    y[np.flatnonzero(y == 1)[20:]] = 0  # 20 positives left
    with pytest.raises(SampleTooSmall, match=r"20 positive .* at least 30 of each"):
        fit_risk_recalibration(p, y, label="dengue", model_threshold=0.5, policy="youden")
    fit = fit_risk_recalibration(
        p, y, label="dengue", model_threshold=0.5, policy="sensitivity>=0.9", min_cases=10
    )
    assert fit["evidence"]["after"]["sensitivity"] >= 0.9
    with pytest.raises(ValueError, match="policy"):
        fit_risk_recalibration(p, y, label="d", model_threshold=0.5, policy="best", min_cases=1)
    with pytest.raises(ValueError, match="separates"):
        fit_logistic_recalibration(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1.0]))
    with pytest.raises(ValueError, match="one outcome class"):
        fit_logistic_recalibration(np.array([0.1, 0.2]), np.array([1, 1.0]))


# --------------------------------------------------------------------------- a tiny risk model


def _dengue_like(n: int, site: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    """Rows in the OUCRU table's columns (dengue_vn_cbc schema): low white cells and platelets
    mean dengue; `shift` moves the site's log-odds (its prevalence)."""
    rng = np.random.default_rng(seed)
    age = rng.integers(1, 16, n)
    day = rng.integers(1, 4, n)
    wbc = np.exp(rng.normal(2.1, 0.4, n)).round(2)
    plt_ = rng.normal(230, 60, n).clip(20, 800).round()
    z = -0.8 - 2.0 * (np.log(wbc) - 2.1) - 0.015 * (plt_ - 230) + 0.1 * (age - 8) + shift
    y = rng.random(n) < _sigmoid(z)
    return pd.DataFrame(
        {
            "SiteNo": site,
            "StudyNo": [f"{site}-{seed}-{i:04d}" for i in range(n)],
            "Sex": rng.integers(1, 3, n),
            "Age": age,
            "DayDisease": day,
            "WBC": wbc,
            "PLT": plt_,
            "Lab_Confirmed_Dengue": np.where(y, 1, 2),  # the table's codes: 1 yes, 2 no
        }
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dengue_vn_cbc schema on synthetic rows from two sites: logistic, random split."""
    from diagnostics.train.risk import load_risk_config, train_risk

    root = tmp_path_factory.mktemp("risk_recal")
    table = root / "train.csv"
    pd.concat([_dengue_like(400, 1, 1), _dengue_like(400, 2, 2)]).to_csv(table, index=False)
    cfg = load_risk_config(
        DENGUE,
        [
            f"table={table}",
            "model={estimator: logistic, calibration_cv: 3}",
            "split={strategy: random, cv_folds: 3, seed: 0}",
            "eval.bootstrap=0",
        ],
    )
    with diagnostics_home(root / "home"):
        return train_risk(cfg, log_to_mlflow=False).onnx_path


def test_scoring_applies_a_site_profile(tiny_model):
    model = RiskModel(tiny_model)
    records = _dengue_like(40, 9, 90).drop(columns="Lab_Confirmed_Dengue")
    records.loc[0, "Age"] = 20  # outside the intended population: refused, profile or not
    own = model.score(records)
    assert own["profile_id"].isna().all() and (own["threshold"] == model.threshold).all()
    scored = own["status"] == "scored"
    assert own.loc[scored, "risk"].equals(own.loc[scored, "raw_risk"])
    assert own.loc[0, "status"] == "rejected" and np.isnan(own.loc[0, "raw_risk"])

    profile = SimpleNamespace(
        id=7,
        temperatures={"dengue": 0.5},
        intercepts={"dengue": 1.0},
        thresholds={"dengue": 0.9},
    )
    site = model.score(records, profile)
    assert list(site["profile_id"]) == [7] * len(records) and (site["threshold"] == 0.9).all()
    assert site["raw_risk"].equals(own["raw_risk"])  # the model's own probability, kept
    expected = recalibrate_probability(site.loc[scored, "raw_risk"].to_numpy(), 0.5, 1.0)
    assert site.loc[scored, "risk"].to_numpy() == pytest.approx(expected)
    assert not np.allclose(site.loc[scored, "risk"], own.loc[scored, "risk"])
    high = site.loc[scored, "risk"] >= 0.9
    assert (site.loc[scored, "category"] == np.where(high, "high", "low")).all()
    assert site.loc[0, "status"] == "rejected" and np.isnan(site.loc[0, "risk"])
    for column in ("row", "status", "risk", "category", "imputed", "code", "reasons"):
        assert column in site.columns
    assert (site["model_sha256"] == model.sha256).all()

    # a profile for other labels (e.g. an image model's) is ignored; no intercepts: none
    other = SimpleNamespace(id=8, temperatures={"Pneumonia": 2.0}, intercepts=None,
                            thresholds={"Pneumonia": 0.1})  # fmt: skip
    ignored = model.score(records, other)
    assert ignored["profile_id"].isna().all() and ignored["risk"].equals(own["risk"])
    assert (ignored["threshold"] == model.threshold).all()
    temp_only = SimpleNamespace(id=9, temperatures={"dengue": 2.0}, intercepts=None,
                                thresholds={})  # fmt: skip
    t = model.score(records, temp_only)
    assert (t["threshold"] == model.threshold).all() and t["profile_id"].iloc[0] == 9
    assert t.loc[scored, "risk"].to_numpy() == pytest.approx(
        recalibrate_probability(own.loc[scored, "raw_risk"].to_numpy(), 2.0, 0.0)
    )


def test_models_recalibrate_stores_a_risk_site_profile(tiny_model, home, tmp_path):
    """`diagnostics models recalibrate MODEL --site S --table CSV --rows SiteNo=9`: the site's
    rows only, refused rows counted, the profile (temperatures, intercepts, thresholds) saved."""
    import yaml
    from typer.testing import CliRunner

    from diagnostics.cli import app
    from diagnostics.serve.store import Store

    site = _dengue_like(900, 9, 99, shift=1.2)  # this site's children have more dengue
    site.loc[0, "Age"] = 20  # outside the intended population
    site.loc[1, "Lab_Confirmed_Dengue"] = None  # no outcome
    site["WBC"] = site["WBC"].astype(object)
    site.loc[2, "WBC"] = "lots"  # not a number
    table = tmp_path / "site.csv"
    pd.concat([site, _dengue_like(50, 3, 3, shift=-3)]).to_csv(table, index=False)
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "serve")}))
    base = ["models", "recalibrate", str(tiny_model), "--site", "clinic-9"]
    where = ["--serve-config", str(serve_yaml)]
    runner = CliRunner()

    r = runner.invoke(app, [*base, "--table", str(table), "--rows", "SiteNo=9", *where])
    assert r.exit_code == 0, r.output
    assert "dengue: n=897" in r.output and "calibration intercept" in r.output
    assert "sensitivity" in r.output and "site profile 1 for clinic-9" in r.output
    assert "outside_intended_population 1" in r.output and "invalid_value 1" in r.output
    assert "outcome_missing 1" in r.output

    store = Store(f"sqlite:///{tmp_path / 'serve' / 'service.db'}", tmp_path / "blobs")
    profile = store.site_profile(RiskModel(tiny_model).sha256, "clinic-9")
    assert profile is not None and profile.id == 1 and profile.policy == "youden"
    assert set(profile.temperatures) == set(profile.intercepts) == set(profile.thresholds)
    assert set(profile.thresholds) == {"dengue"}
    assert profile.intercepts["dengue"] > 0.6  # the site's higher prevalence, learnt
    assert 0 < profile.thresholds["dengue"] < 1 and profile.temperatures["dengue"] > 0
    ev = profile.evidence["dengue"]
    assert ev["n"] == 897 and ev["rows"]["selection"] == {"SiteNo": "9"}
    assert ev["refused"] == {
        "outside_intended_population": 1,
        "invalid_value": 1,
        "outcome_missing": 1,
    }
    assert ev["before"]["calibration_intercept"] > 0.6
    assert abs(ev["after"]["calibration_intercept"]) < 0.05
    # at the clinic, the profile from the database moves this site's risks up
    records = site.iloc[3:23].drop(columns="Lab_Confirmed_Dengue")
    scored = RiskModel(tiny_model).score(records, profile)
    assert (scored["profile_id"] == 1).all() and (scored["risk"] > scored["raw_risk"]).mean() > 0.5

    # the wrong options for a risk model are refused in words
    r = runner.invoke(app, [*base, "-c", str(serve_yaml), *where])
    assert r.exit_code == 2 and "is a risk model" in r.output and "--table" in r.output
    r = runner.invoke(app, [*base, *where])
    assert r.exit_code == 2 and "--table CSV" in r.output
    r = runner.invoke(app, [*base, "--table", str(table), "--rows", "Hospital=9", *where])
    assert r.exit_code == 2 and "no column 'Hospital'" in r.output
    r = runner.invoke(app, [*base, "--table", str(table), "--rows", "SiteNo=3", *where])
    assert r.exit_code == 2 and "sample too small" in r.output


# --------------------------------------------------------------------------- real data


def test_the_oucru_model_recalibrated_at_a_held_out_hospital(home, tmp_path):
    """dengue_vn_cbc trained on hospitals 1-4; at hospital 7, recalibrated on a random half
    (stratified by outcome) and judged on the other half: calibration-in-the-large moves to 0,
    AUROC is unchanged (the map is monotone)."""
    from threadpoolctl import threadpool_limits

    from diagnostics.train.metrics import at_threshold, auroc, calibration_fields
    from diagnostics.train.risk import load_risk_config, train_risk

    df = pd.read_csv(shared("clinical", "dengue_oucru_vn.csv"))
    train = tmp_path / "sites_1_4.csv"
    df[df["SiteNo"] != 7].to_csv(train, index=False)
    cfg = load_risk_config(DENGUE, [f"table={train}", "eval.bootstrap=0"])
    with threadpool_limits(1):  # gradient boosting's OpenMP threads crawl on a busy machine
        model_path = train_risk(cfg, log_to_mlflow=False).onnx_path

    site = df[df["SiteNo"] == 7].reset_index(drop=True)
    rng = np.random.default_rng(0)
    fit_idx = np.concatenate(
        [
            (g := rng.permutation(site.index[site["Lab_Confirmed_Dengue"] == v]))[: len(g) // 2]
            for v in (1, 2)
        ]
    )
    fit_table = tmp_path / "site7_fit.csv"
    site.loc[fit_idx].to_csv(fit_table, index=False)
    check = site.drop(index=fit_idx)

    result = recalibrate_risk(model_path, fit_table, rows={"SiteNo": "7"})
    profile = SimpleNamespace(id=1, **{k: result[k] for k in ("temperatures", "intercepts",
                                                              "thresholds")})  # fmt: skip
    model = RiskModel(model_path)
    scored = model.score(check.drop(columns="Lab_Confirmed_Dengue"), profile)
    ok = (scored["status"] == "scored").to_numpy()
    y = (check["Lab_Confirmed_Dengue"] == 1).to_numpy(dtype=float)[ok]
    raw, site_p = scored["raw_risk"].to_numpy()[ok], scored["risk"].to_numpy()[ok]
    before, after = calibration_fields(y, raw), calibration_fields(y, site_p)
    at_b = at_threshold(y, raw, model.threshold)
    at_a = at_threshold(y, site_p, result["thresholds"]["dengue"])
    print(
        f"\nhospital 7, half fitted (n={result['evidence']['dengue']['n']}), other half judged "
        f"(n={len(y)}, {int(y.sum())} dengue): T={result['temperatures']['dengue']:.3f} "
        f"b={result['intercepts']['dengue']:+.3f}; calibration intercept "
        f"{before['calibration_intercept']:+.3f} -> {after['calibration_intercept']:+.3f}, slope "
        f"{before['calibration_slope']:.3f} -> {after['calibration_slope']:.3f}; AUROC "
        f"{auroc(y, raw):.3f} -> {auroc(y, site_p):.3f}; threshold {model.threshold:.3f} -> "
        f"{result['thresholds']['dengue']:.3f}; sensitivity {at_b['sensitivity']:.3f} -> "
        f"{at_a['sensitivity']:.3f}, specificity {at_b['specificity']:.3f} -> "
        f"{at_a['specificity']:.3f}"
    )
    assert abs(after["calibration_intercept"]) < abs(before["calibration_intercept"])
    assert auroc(y, site_p) == pytest.approx(auroc(y, raw), abs=1e-12)
    assert result["refused"] == {} and len(y) == len(check)
