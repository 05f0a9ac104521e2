"""What a CXR model's input QC checks against, measured once the network is trained.

The out-of-distribution reference (`train.ood`) is fitted on the pooled features of a sample of
training images, its threshold set on the validation images. With a configured population, the
model's population check (`train.population`) has its threshold set on the validation images and
the calibration outside images, and is measured on the validation and report outside images,
next to the OOD distance on the same images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diagnostics.contract import OODReference, Population
from diagnostics.train.batches import image_batch, predict_outputs
from diagnostics.train.config import CXRTrainConfig
from diagnostics.train.cxr_data import CXRData, Images
from diagnostics.train.metrics import auroc
from diagnostics.train.population import ImagePool, OutsideImages

log = logging.getLogger(__name__)


@dataclass
class QCReferences:
    """What the clinic's input QC checks against: the OOD reference and the population."""

    ood: OODReference
    population: Population | None
    population_report: dict[str, Any] | None


def qc_references(
    cfg: CXRTrainConfig, model: torch.nn.Module, data: CXRData, images: Images
) -> QCReferences:
    """The OOD reference, and the intended population with its check (if configured)."""
    bs = cfg.train.batch_size * 2
    ood = _ood_reference(cfg, model, images.cache, data.idx, bs)
    population, report = _population(cfg, model, images.cache, data.idx, bs, data.outside, ood)
    return QCReferences(ood, population, report)


def _ood_reference(
    cfg: CXRTrainConfig,
    model: Any,
    cache: np.ndarray,
    idx: dict[str, np.ndarray],
    batch_size: int,
) -> OODReference:
    """Fit the OOD reference on a sample of training images; set its threshold on val."""
    from diagnostics.train.ood import embeddings, fit_reference

    ev, spec = cfg.eval, cfg.preprocess
    rng = np.random.default_rng(cfg.train.seed + 1)
    n = min(ev.ood_images, len(idx["train"]))
    sample = np.sort(rng.choice(idx["train"], n, replace=False))

    def feats(ids: np.ndarray) -> np.ndarray:
        chunks = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
        return embeddings(model.cpu(), [image_batch(cache, c, spec, None) for c in chunks])

    ref = fit_reference(
        feats(sample),
        feats(idx["val"]),
        components=ev.ood_components,
        quantile=ev.ood_quantile,
        margin=ev.ood_margin,
    )
    log.info(
        "OOD reference: %d training images, threshold %.2f (val median %.2f, max %.2f)",
        ref.fitted_on,
        ref.threshold,
        ref.validation_scores["median"],
        ref.validation_scores["max"],
    )
    return ref


def _population(
    cfg: CXRTrainConfig,
    model: Any,
    cache: np.ndarray | ImagePool,
    idx: dict[str, np.ndarray],
    batch_size: int,
    outside: OutsideImages | None,
    ood: OODReference,
) -> tuple[Population | None, dict[str, Any] | None]:
    """The intended population for the metadata, with its check: its threshold set on the
    validation images and the calibration outside images, and measured on the validation images
    and the report outside images (none of which it trained on). For the record, the OOD
    distance is measured on the same images."""
    from diagnostics.serve.qc import OODDetector
    from diagnostics.train.ood import embeddings
    from diagnostics.train.population import fit_check, population_metadata

    if cfg.population is None:
        return None, None
    check_cfg = cfg.population.check
    if check_cfg is None or outside is None:
        return population_metadata(cfg.population, None), None
    spec = cfg.preprocess
    cpu = torch.device("cpu")
    if not isinstance(cache, ImagePool):
        raise TypeError("the population check needs the pooled inside and outside images")
    first = int(cache.offsets[1])  # outside images come after the inside ones

    def logits(ids: np.ndarray) -> np.ndarray:
        _, z = predict_outputs(model.cpu(), cache, ids, spec, cpu, batch_size)
        if z is None:
            raise ValueError("the model has no population head")
        return z

    calibration = first + np.flatnonzero(outside.part == "calibrate")
    report = outside.part == "report"
    held = first + np.flatnonzero(report)
    check = fit_check(
        check_cfg, logits(idx["val"]), logits(calibration), logits(held), outside.groups[report]
    )
    # The OOD distance on the same images: what the population check is compared with.
    detector = OODDetector(ood)

    def distance(ids: np.ndarray) -> np.ndarray:
        chunks = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
        return detector.score(
            embeddings(model, [image_batch(cache, c, spec, None) for c in chunks])
        )

    d_val, d_out = distance(idx["val"]), distance(held)
    ood_compare = {
        "auroc": auroc(np.r_[np.zeros(len(d_val)), np.ones(len(d_out))], np.r_[d_val, d_out]),
        "outside_refused": float((d_out > ood.threshold).mean()),
        "inside_val_refused": float((d_val > ood.threshold).mean()),
    }
    report = {
        "threshold": check.threshold,
        "rule": check.rule,
        "metrics": check.metrics,
        "ood_distance_on_same_images": ood_compare,
    }
    log.info(
        "population check: AUROC %.3f; refuses %.1f%% of held-out outside images and %.1f%% of "
        "validation images (the OOD distance alone: %.1f%% and %.1f%%)",
        check.metrics["auroc"],
        100 * check.metrics["outside_refused"],
        100 * check.metrics["inside_val_refused"],
        100 * ood_compare["outside_refused"],
        100 * ood_compare["inside_val_refused"],
    )
    return population_metadata(cfg.population, check), report
