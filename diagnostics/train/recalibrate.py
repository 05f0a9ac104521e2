"""Per-site recalibration: a site's own temperature and thresholds for one model file, and
its own threshold for the model's population check.

Fitted on the site's labelled images (e.g. `diagnostics reviews export`); stored as a site
profile in the service's database, tied to the model's sha256; the ONNX file is unchanged.
Thresholds must be re-chosen whenever the model or the site changes: a threshold chosen
elsewhere may no longer give the sensitivity it promised. The population threshold comes from
the site's own images of patients inside the intended population, by the model's own rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diagnostics.contract import calibrated_probability
from diagnostics.train.calibrate import choose_threshold, fit_temperature
from diagnostics.train.metrics import at_threshold


class SampleTooSmall(ValueError):
    pass


def recalibrate(
    model_path: Any, data_cfg: Any, *, policy: str | None = None, min_cases: int = 30
) -> dict[str, Any]:
    """Temperatures and thresholds per finding from the site's data (every row), with the
    sensitivity/specificity before (the model's own) and after (the site's) on that data."""
    from diagnostics.data.cxr import load_dataset
    from diagnostics.serve.runner import OnnxModel
    from diagnostics.train.evaluate import score_paths

    runner = OnnxModel(model_path)
    meta = runner.metadata
    table = load_dataset(data_cfg)
    frame = table.frame
    _, logits = score_paths(runner, frame["path"].tolist())
    temps, thresholds, evidence = {}, {}, {}
    for i, f in enumerate(meta.labels):
        if f not in table.findings:
            continue
        y = frame[f].to_numpy(dtype=float)
        known = ~np.isnan(y)
        y, z = y[known], logits[known, i]
        pos, neg = int(y.sum()), int(len(y) - y.sum())
        chosen = policy or meta.thresholds[f].policy
        if pos < min_cases or neg < min_cases:
            raise SampleTooSmall(
                f"{f}: {pos} positive and {neg} negative labelled images; the policy "
                f"{chosen!r} needs at least {min_cases} of each (--min-cases)"
            )
        t = fit_temperature(z, y)
        p_site = calibrated_probability(z, t)
        thr = choose_threshold(y, p_site, chosen)
        p_model = calibrated_probability(z, meta.temperature[i])
        before = at_threshold(y, p_model, meta.thresholds[f].value)
        after = at_threshold(y, p_site, thr)
        temps[f], thresholds[f] = float(t), float(thr)
        evidence[f] = {
            "n": len(y),
            "positives": pos,
            "policy": chosen,
            "model_temperature": meta.temperature[i],
            "model_threshold": meta.thresholds[f].value,
            "before": {k: before[k] for k in ("sensitivity", "specificity")},
            "after": {k: after[k] for k in ("sensitivity", "specificity")},
        }
    if not temps:
        raise ValueError(f"the site data annotates none of the model's findings {meta.labels}")
    return {
        "model_sha256": runner.sha256,
        "temperatures": temps,
        "thresholds": thresholds,
        "policy": policy or "model's own",
        "evidence": evidence,
    }


def recalibrate_population(model_path: Any, data_cfg: Any, *, min_images: int = 100) -> dict:
    """A site's own threshold for the model's population check, by the model's own rule with
    the site's images of patients inside the intended population (every row of `data_cfg`) in
    place of its validation images: refuse at most the same share of them, and never be
    stricter than the bound the model's calibration outside images set. DICOM images whose age
    is outside the range are left out. Returns the threshold with the share of these images
    refused before (the model's threshold) and after (the site's)."""
    from diagnostics.data.cxr import load_dataset
    from diagnostics.imaging import decode, normalize, resize_square
    from diagnostics.serve.runner import OnnxModel

    runner = OnnxModel(model_path)
    pop = runner.metadata.population
    if pop is None or pop.check is None or runner.population_output is None:
        raise ValueError(f"{runner.path.name} has no population check to recalibrate")
    spec = runner.metadata.preprocessing
    scores, left_out = [], 0
    for path in load_dataset(data_cfg).frame["path"]:
        image = decode(path)
        if image.age_years is not None and not pop.age_inside(image.age_years):
            left_out += 1  # the age says this patient is outside: not evidence for the site
            continue
        x = normalize(resize_square(image.pixels, spec), spec)[None]
        scores.append(float(runner.predict(x).population[0]))
    z = np.asarray(scores, dtype=np.float64)
    z = z[np.isfinite(z)]
    if len(z) < min_images:
        raise SampleTooSmall(
            f"{len(z)} usable images ({left_out} left out by their age); a population "
            f"threshold needs at least {min_images} images of patients inside the intended "
            "population (--min-cases)"
        )
    q = pop.check.max_inside_refused
    threshold = float(np.quantile(z, q, method="lower"))
    if pop.check.outside_bound is not None:
        threshold = min(threshold, pop.check.outside_bound)
    return {
        "model_sha256": runner.sha256,
        "population_threshold": threshold,
        "evidence": {
            "n": len(z),
            "left_out_by_age": left_out,
            "rule": f"refuse at most {q:.1%} of the site's in-population images, never above "
            f"the model's outside bound ({pop.check.outside_bound})",
            "model_threshold": pop.check.threshold,
            "refused_before": float((z < pop.check.threshold).mean()),
            "refused_after": float((z < threshold).mean()),
            "model_outside_refused": pop.check.metrics.get("outside_refused"),
        },
    }
