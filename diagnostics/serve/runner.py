"""ONNX Runtime inference on a self-describing model file. Torch-free.

- `OnnxModel` loads an exported file, checks its sha256 when one is expected, reads its
  `ModelMetadata`, picks an execution provider (CUDA when asked for and present, CPU otherwise,
  and says which it got), and turns preprocessed batches into calibrated probabilities.
- `Scorer` is the whole path for one study: decode -> QC -> preprocess -> model -> OOD check ->
  findings, with a CAM overlay PNG for each positive finding and the time each step took. Each
  finding is judged at an operating point (the model's own, or a site profile's where the
  site has one) and carries it; the result carries the preprocessing it went through.

Registry URIs (`models:/name@alias`) are resolved to a local file by the caller (the CLI), which
downloads the `.onnx` artefact; this module only ever reads ONNX files, never pickles.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from diagnostics.contract import (
    Finding,
    ModelMetadata,
    OperatingPoint,
    calibrated_probability,
    file_sha256,
    is_positive,
)
from diagnostics.imaging import ImageError, decode, set_decode_threads
from diagnostics.serve import qc
from diagnostics.serve.qc import OODDetector, QCConfig, QCResult

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
T = TypeVar("T")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class ModelIntegrityError(ValueError):
    pass


@dataclass
class Prediction:
    logits: np.ndarray  # (B, F)
    probabilities: np.ndarray  # (B, F), calibrated
    cam: np.ndarray | None  # (B, F, h, w), logit units
    embedding: np.ndarray | None = None  # (B, C) pooled features, for the OOD check
    population: np.ndarray | None = None  # (B,) the population check's logit (>= limit: inside)


class OnnxModel:
    def __init__(
        self,
        path: str | Path,
        *,
        device: Device = "cpu",
        threads: int | None = None,
        expected_sha256: str | None = None,
        version: str | None = None,
        precision_reason: str | None = None,
    ) -> None:
        import onnxruntime as ort

        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
        self.path = Path(path)
        self.sha256 = file_sha256(self.path)
        if expected_sha256 and expected_sha256.strip().lower() != self.sha256:
            raise ModelIntegrityError(
                f"model file sha256 {self.sha256} does not match the expected {expected_sha256}"
            )
        self.version = version  # registry version, when loaded from the registry
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # intra-op: the threads one operator (a convolution) is split over; None: ORT's default
        # (one per physical core). A worker sets it from its share of the host's cores
        # (`worker.scoring_threads`). inter-op threads only run independent branches in ORT's
        # parallel mode, which is off: one is enough.
        self.threads = threads or None
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # ORT's intra-op threads spin after each run, waiting for the next; here the next thing
        # on those cores is the decoding of the next image, which their spinning would slow (a
        # JPEG 2000 decode by 40%). They still spin within a run.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.requested_device = device
        wanted = [CPU]
        if device in ("auto", "cuda") and CUDA in ort.get_available_providers():
            wanted = [CUDA, CPU]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=wanted)
        except Exception as exc:  # a CUDA provider that is listed but cannot start
            if wanted[0] != CUDA:
                raise
            log.warning("CUDA provider failed to start (%s): running on CPU", type(exc).__name__)
            self.session = ort.InferenceSession(str(self.path), options, providers=[CPU])
        # ORT's automatic fallback differs between versions (PITFALLS.md): ask what it uses.
        self.provider = self.session.get_providers()[0]
        # A fallback: CUDA was asked for, or (auto) ORT has CUDA but the session did not get it.
        wants_cuda = device == "cuda" or (device == "auto" and wanted[0] == CUDA)
        self.fallback = wants_cuda and self.provider != CUDA
        if self.fallback:
            log.warning(
                "CUDA was requested but is unavailable: running on CPU (%s)",
                "onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu on a CUDA "
                "machine"
                if CUDA not in ort.get_available_providers()
                else "the CUDA provider did not start: check the CUDA and cuDNN libraries",
            )
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ModelMetadata.from_props(props)
        # "int8" for a quantised file, else "fp32"; recorded with every result. The reason is
        # the loader's (serve/precision.py: why this file and not its twin), or None.
        self.precision: Literal["int8", "fp32"] = "int8" if self.metadata.quantization else "fp32"
        self.precision_reason = precision_reason
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        # A named (symbolic) batch dimension means any batch size; a number fixes it.
        self.max_batch = None if not isinstance(first.shape[0], int) else int(first.shape[0])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._temperature = np.asarray(self.metadata.temperature, dtype=np.float64)
        self.ood = (
            OODDetector(self.metadata.ood)
            if self.metadata.ood is not None and "embedding" in self.output_names
            else None
        )
        pop = self.metadata.population
        # the graph output holding the population check's logit, when the model has one
        self.population_output = pop.check.output if pop and pop.check else None
        if self.population_output and self.population_output not in self.output_names:
            raise ModelIntegrityError(
                f"the metadata names a population check in output {self.population_output!r}, "
                "which the graph lacks: the file was altered or exported wrongly"
            )

    @property
    def labels(self) -> list[str]:
        return list(self.metadata.labels)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.metadata.name,
            "version": self.version,
            "sha256": self.sha256,
            "architecture": self.metadata.architecture,
            "labels": self.labels,
            "provider": self.provider,
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "int8_gate": (
                self.metadata.int8_gate.model_dump(exclude={"auroc_deltas"})
                if self.metadata.int8_gate is not None
                else None
            ),
            "requested_device": self.requested_device,
            "fallback": self.fallback,
            "intra_op_threads": self.threads,  # None: ONNX Runtime's default
            "preprocess_version": self._preprocess_version(),
            "ood_reference": self.ood is not None,
            "population": self._population_summary(),
        }

    def _population_summary(self) -> dict[str, Any] | None:
        pop = self.metadata.population
        if pop is None:
            return None
        return {
            "ages": pop.age_text(),
            "age_years": list(pop.age_years) if pop.age_years else None,
            "modalities": pop.modalities,
            "views": pop.views,
            "description": pop.description,
            "check": self.population_output is not None,
        }

    def _preprocess_version(self) -> str | None:
        spec = self.metadata.preprocessing
        return spec.version if spec is not None else None

    def predict(self, batch: np.ndarray, *, cam: bool = False) -> Prediction:
        """`batch` (B, C, S, S) float32 from `imaging.preprocess` with this model's spec."""
        names = ["logits"]
        if cam and "cam" in self.output_names:
            names.append("cam")
        if "embedding" in self.output_names:
            names.append("embedding")
        if self.population_output is not None:
            names.append(self.population_output)
        batch = np.ascontiguousarray(batch, np.float32)
        step = self.max_batch or len(batch) or 1
        parts = [
            dict(
                zip(
                    names,
                    self.session.run(names, {self.input_name: batch[i : i + step]}),
                    strict=True,
                )
            )
            for i in range(0, len(batch), step)
        ]

        def cat(name: str) -> np.ndarray | None:
            return np.concatenate([p[name] for p in parts]) if parts and name in parts[0] else None

        logits = np.asarray(cat("logits"), dtype=np.float64)
        # a NaN logit stays NaN (visible), never a confident 0 or 1
        probs = calibrated_probability(logits, self._temperature)
        population = cat(self.population_output) if self.population_output else None
        return Prediction(
            logits=logits,
            probabilities=probs,
            cam=cat("cam"),
            embedding=cat("embedding"),
            population=None if population is None else population.reshape(-1).astype(np.float64),
        )


# --------------------------------------------------------------------------- one study


Status = Literal["scored", "failed_qc", "failed"]
PROCESSING_ERROR = "processing_error"  # an input that broke decoding in an unforeseen way


@dataclass
class ScoreResult:
    """Everything about one input. `findings` is empty unless `status == "scored"`."""

    status: Status
    code: str | None = None  # the refusal or failure code
    message: str | None = None
    qc: list[QCResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    ood_score: float | None = None
    model_sha256: str = ""
    model_name: str = ""
    model_version: str | None = None
    preprocess_version: str | None = None
    # the whole PreprocessSpec the image went through (JSON): the review page resizes the image
    # under the heatmaps with it, whatever model serves by then
    preprocessing: dict[str, Any] | None = None
    site_profile: int | None = None  # the site profile the input was judged under, if any
    provider: str = ""
    precision: str = ""  # "int8" or "fp32": the model file that ran
    timing_ms: dict[str, float] = field(default_factory=dict)
    image: dict[str, Any] = field(default_factory=dict)  # format, size, safe DICOM tags
    # Scored, but with no call: e.g. ["outside_intended_population"] where a site flags instead
    # of refusing. `message` then says why.
    flags: list[str] = field(default_factory=list)
    # How the population was decided: evidence ("age" | "check" | "none"), inside, age_years,
    # age_source, check_score, check_limit.
    population: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "flags": list(self.flags),
            "population": dict(self.population),
            "findings": [f.model_dump() for f in self.findings],
            "qc": [r.as_dict() for r in self.qc],
            "ood_score": self.ood_score,
            "model_sha256": self.model_sha256,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "preprocess_version": self.preprocess_version,
            "preprocessing": self.preprocessing,
            "site_profile": self.site_profile,
            "provider": self.provider,
            "precision": self.precision,
            "timing_ms": self.timing_ms,
            "image": self.image,
        }


@dataclass
class _Pending:
    result: ScoreResult
    pixels: np.ndarray | None = None  # (S, S) in [0, 1] as the model sees it, for overlays
    x: np.ndarray | None = None  # (C, S, S) model input
    t0: float = 0.0
    age_decided: bool = False  # the DICOM age settled the population question
    population_limit: float | None = None  # a site's own population-check threshold
    # label -> the operating point this input is judged by (a site profile's where it has one)
    points: dict[str, OperatingPoint] = field(default_factory=dict)


# At most this many images decoded side by side: each holds its full-resolution pixels while it
# decodes (up to ~6 bytes a pixel, 50 Mpx at most), and each JPEG 2000 decode starts OpenJPEG's
# own threads (OPJ_NUM_THREADS, `imaging.set_decode_threads`).
MAX_SIDE_BY_SIDE = 4


class Scorer:
    """decode -> QC -> preprocess -> model -> OOD -> findings (+ CAM overlays), batched."""

    def __init__(
        self,
        model: OnnxModel,
        qc_config: QCConfig | None = None,
        *,
        heatmap_dir: str | Path | None = None,
        batch_size: int = 8,
        parallel_decode: bool = True,
    ) -> None:
        if model.metadata.task != "cxr" or model.metadata.preprocessing is None:
            raise ValueError(f"{model.path.name} is not a CXR model (task {model.metadata.task})")
        self.model = model
        self.qc = qc_config or QCConfig()
        self.population = model.metadata.population
        pop = self.population
        if pop is not None:  # the model's own population narrows the site's lists
            self.qc = self.qc.model_copy(
                update={
                    "modalities": [m for m in self.qc.modalities if m in pop.modalities],
                    "views": [v for v in self.qc.views if v in pop.views],
                }
            )
        self.spec = model.metadata.preprocessing
        self.heatmap_dir = Path(heatmap_dir) if heatmap_dir is not None else None
        self.batch_size = max(1, batch_size)
        self.points = self.operating_points(None)  # the model's own
        # Decoding and the model take turns on the same cores: the model's intra-op threads,
        # or (ORT's default, a thread per physical core) the CPUs this process may use.
        self.decode_threads = model.threads or available_cores()
        set_decode_threads(self.decode_threads)
        # The images of one call decoded side by side: for a batch runner, whose cores are
        # otherwise idle while it decodes; the service turns it off (`ModelHolder`).
        self.parallel_decode = parallel_decode
        self._prepare_pool: Any = None  # made at first use
        self._pool_lock = threading.Lock()

    def operating_points(self, profile: Any = None) -> dict[str, OperatingPoint]:
        """The operating point of each finding, label -> OperatingPoint.

        `profile`: a site profile (`store.SiteProfile`, or anything with `id`, `temperatures`,
        `thresholds`, `policy` and `evidence`), or None. A finding the profile recalibrated
        (it has a temperature and a threshold for it) gets the site's; the others keep the
        model's own, chosen on its validation split."""
        meta = self.model.metadata
        out = {}
        for i, label in enumerate(meta.labels):
            thr = meta.thresholds[label]
            out[label] = OperatingPoint(
                threshold=thr.value,
                temperature=meta.temperature[i],
                policy=thr.policy,
                sensitivity=_number(thr.sensitivity),
                specificity=_number(thr.specificity),
            )
            if profile is None:
                continue
            temps, thresholds = profile.temperatures or {}, profile.thresholds or {}
            if label not in temps or label not in thresholds:
                continue
            evidence = (profile.evidence or {}).get(label) or {}
            after = evidence.get("after") or {}  # on the site's own labelled images
            out[label] = OperatingPoint(
                threshold=float(thresholds[label]),
                temperature=float(temps[label]),
                policy=str(evidence.get("policy") or profile.policy),
                sensitivity=_number(after.get("sensitivity")),
                specificity=_number(after.get("specificity")),
                source="site_profile",
                profile_id=profile.id,
            )
        return out

    def _base(self) -> ScoreResult:
        m = self.model
        return ScoreResult(
            status="failed",
            model_sha256=m.sha256,
            model_name=m.metadata.name,
            model_version=m.version,
            preprocess_version=self.spec.version,
            preprocessing=self.spec.model_dump(mode="json"),
            provider=m.provider,
            precision=m.precision,
        )

    def _prepare_all(self, items: list[bytes]) -> list[_Pending]:
        """`_prepare` each input, in order. Several inputs are prepared side by side, on as
        many threads as decoding may use (at most `MAX_SIDE_BY_SIDE`): Pillow, zlib, OpenJPEG
        and numpy release the GIL, so a batch's decodes
        fill the cores between model runs instead of leaving all but one idle. Each input's
        `timing_ms["decode"]` is then its own wall time, the others' decodes running beside."""
        if len(items) < 2 or self.decode_threads < 2 or not self.parallel_decode:
            return [self._prepare(d) for d in items]
        with self._pool_lock:
            if self._prepare_pool is None:
                from concurrent.futures import ThreadPoolExecutor

                workers = min(self.decode_threads, MAX_SIDE_BY_SIDE)
                self._prepare_pool = ThreadPoolExecutor(workers, thread_name_prefix="prepare")
        return list(self._prepare_pool.map(self._prepare, items))

    def _prepare(self, data: bytes) -> _Pending:
        """Decode, QC and preprocess one input. Never raises: a failure is the result."""
        t0 = time.perf_counter()
        pending = _Pending(self._base(), t0=t0)
        try:
            self._prepare_into(pending, data)
        except Exception as exc:  # a file that breaks the decoder in an unforeseen way
            log.warning("input could not be processed: %s", type(exc).__name__)
            res = pending.result
            res.status, res.code = "failed", PROCESSING_ERROR
            res.message = f"The image could not be processed ({type(exc).__name__})."
            pending.x = None
        return pending

    def _prepare_into(self, pending: _Pending, data: bytes) -> None:
        from diagnostics.imaging import normalize, resize_square

        t0 = pending.t0
        res = pending.result
        try:
            image = decode(data, max_pixels=self.qc.max_pixels, target=self.spec.size)
        except ImageError as exc:
            res.status, res.code, res.message = "failed_qc", exc.code, exc.message
            res.qc = [QCResult(exc.code, False, exc.message, "intake")]
            res.timing_ms["decode"] = _ms(t0)
            return
        t1 = time.perf_counter()
        res.timing_ms["decode"] = _ms(t0, t1)
        res.image = {"format": image.format, "rows": image.shape[0], "cols": image.shape[1]}
        res.image.update({k: v for k, v in image.dicom.items() if k in _REPORTED_TAGS})
        res.qc = [
            qc.QCResult("format", True, image.format, "intake"),
            *qc.check_image(image, self.qc),
        ]
        t2 = time.perf_counter()
        res.timing_ms["qc"] = _ms(t1, t2)
        failed = [r for r in res.qc if not r.passed]
        if failed:
            res.status, res.code, res.message = "failed_qc", failed[0].code, failed[0].message
            return
        # The intended population, by the patient's age, before any score.
        ages = self.population.age_years if self.population is not None else None
        res.population = {"evidence": "none", "inside": None, "ages": list(ages) if ages else None}
        if image.age_years is not None:
            res.population.update(
                age_years=qc.coarse_age(image.age_years), age_source=image.age_source
            )
        by_age = qc.check_age(self.population, image.age_years, image.age_source)
        if by_age is not None:
            pending.age_decided = True
            res.population.update(evidence="age", inside=by_age.passed)
            if not by_age.passed and self._outside(res, by_age):
                return
            if by_age.passed:
                res.qc.append(by_age)
        pending.pixels = resize_square(image.pixels, self.spec, geometry=image.geometry)
        pending.x = normalize(pending.pixels, self.spec)  # (C, S, S)
        res.timing_ms["preprocess"] = _ms(t2)

    def _outside(self, res: ScoreResult, check: QCResult) -> bool:
        """A patient outside the intended population: refuse (True: stop here), or flag and go
        on to score with no call (False), as the site's QC config says."""
        if self.qc.population == "refuse":
            message = check.message + " It was not scored."
            res.qc.append(replace(check, message=message))
            res.status, res.code, res.message = "failed_qc", check.code, message
            return True
        message = check.message + " It was scored with a flag: the AI makes no call."
        res.qc.append(replace(check, message=message))
        res.flags.append(check.code)
        res.message = message
        return False

    def score_many(
        self,
        items: list[bytes],
        names: list[str] | None = None,
        population_limits: list[float | None] | None = None,
        profiles: list[Any] | None = None,
    ) -> list[ScoreResult]:
        """One result per input, in order. Inputs that pass QC are run through the model in
        batches of `batch_size`. `names` (for heatmap file names) default to item indices.
        `population_limits` are per-input thresholds for the population check (a site's own,
        from its profile); None keeps the model's. `profiles` are per-input site profiles
        (see `operating_points`), or None: each finding's call, and so its heatmap, is made
        at the operating point the input's site uses."""
        names = names or [str(i) for i in range(len(items))]
        pendings = self._prepare_all(items)
        for p, limit in zip(pendings, population_limits or [], strict=False):
            p.population_limit = limit
        for i, p in enumerate(pendings):
            profile = profiles[i] if profiles and i < len(profiles) else None
            p.points = self.operating_points(profile) if profile is not None else self.points
            p.result.site_profile = profile.id if profile is not None else None
        ready = [i for i, p in enumerate(pendings) if p.x is not None]
        for start in range(0, len(ready), self.batch_size):
            chunk = ready[start : start + self.batch_size]
            t0 = time.perf_counter()
            try:
                batch = np.stack([x for i in chunk if (x := pendings[i].x) is not None])
                pred = self.model.predict(batch, cam=True)
            except Exception as exc:  # ORT errors: the job fails with a code, no score
                for i in chunk:
                    r = pendings[i].result
                    r.status, r.code = "failed", "model_error"
                    r.message = f"The model could not run: {type(exc).__name__}"
                continue
            per = _ms(t0) / len(chunk)  # the batch's model time, shared equally
            for k, i in enumerate(chunk):
                pendings[i].result.timing_ms["model"] = per
                try:
                    self._finish(pendings[i], pred, k, names[i])
                except Exception as exc:  # e.g. a heatmap that cannot be written
                    log.warning("finishing a study failed: %s", type(exc).__name__)
                    r = pendings[i].result
                    r.status, r.code, r.findings = "failed", "worker_error", []
                    r.message = f"The result could not be completed ({type(exc).__name__})."
        for p in pendings:  # this study's own steps; a batch's model time is shared equally
            p.result.timing_ms["total"] = round(sum(p.result.timing_ms.values()), 3)
        return [p.result for p in pendings]

    def score_iter(self, items: Iterable[tuple[str, bytes | T]]) -> Iterator[ScoreResult | T]:
        """`score_many` over a stream of (name, data), `batch_size` items at a time, so only one
        batch is held in memory however many inputs there are. One result per item, in order.
        Where `data` is not bytes (the caller's record of an input it could not read), it comes
        back unchanged in the result's place."""
        stream = iter(items)
        while chunk := list(islice(stream, self.batch_size)):
            ready = [(name, data) for name, data in chunk if isinstance(data, bytes)]
            results = iter(self.score_many([d for _, d in ready], [n for n, _ in ready]))
            for _, data in chunk:
                yield next(results) if isinstance(data, bytes) else data

    def score(self, data: bytes, name: str = "0") -> ScoreResult:
        return self.score_many([data], [name])[0]

    def _finish(self, p: _Pending, pred: Prediction, k: int, name: str) -> None:
        res = p.result
        probs, logits = pred.probabilities[k], pred.logits[k]
        if not (np.isfinite(probs).all() and np.isfinite(logits).all()):
            res.status, res.code = "failed", qc.NON_FINITE
            res.message = "The model produced an invalid number (NaN or Inf); nothing was stored."
            return
        if self.qc.ood and self.model.ood is not None and pred.embedding is not None:
            score = float(self.model.ood.score(pred.embedding[k : k + 1])[0])
            res.ood_score = score if np.isfinite(score) else None
            check = self.model.ood.check(score)
            res.qc.append(check)
            if not check.passed:
                res.status, res.code, res.message = "failed_qc", check.code, check.message
                return
        elif self.qc.ood:
            res.qc.append(
                QCResult("distribution", True, "skipped: the model has no OOD reference", "model")
            )
        if self._population_check(p, pred, k):
            return
        flagged = bool(res.flags)
        t0 = time.perf_counter()
        meta = self.model.metadata
        for i, label in enumerate(meta.labels):
            point = (p.points or self.points)[label]
            prob = float(probs[i])
            if point.source == "site_profile":  # the site's own temperature
                prob = float(calibrated_probability(logits[i], point.temperature))
            # flagged (outside the population): no call, whatever the operating point
            positive = None if flagged else is_positive(prob, point.threshold)
            heatmap = None
            if (
                positive
                and pred.cam is not None
                and self.heatmap_dir is not None
                and p.pixels is not None
            ):
                heatmap = f"{name}_{label}.png"
                write_overlay(p.pixels, pred.cam[k, i], self.heatmap_dir / heatmap)
            res.findings.append(
                Finding(
                    label=label,
                    probability=prob,
                    threshold=point.threshold,
                    positive=positive,
                    heatmap=heatmap,
                    logit=float(logits[i]),
                    operating_point=point,
                )
            )
        res.timing_ms["heatmaps"] = _ms(t0)
        res.status, res.code = "scored", None
        if not flagged:
            res.message = None

    def _population_check(self, p: _Pending, pred: Prediction, k: int) -> bool:
        """The model's own population check, which decides when no age is known (True: refused).
        With a known age it is only recorded: the age decides."""
        res, pop = p.result, self.population
        if pop is None or pop.check is None or pred.population is None:
            if not p.age_decided:
                note = "skipped: the model has no population check"
                res.qc.append(QCResult("population", True, note, "population"))
            return False
        score = float(pred.population[k])
        check = qc.check_population_score(pop, score, p.population_limit)
        limit = pop.check.threshold if p.population_limit is None else p.population_limit
        res.population.update(check_score=round(score, 4), check_limit=limit)
        if p.age_decided:
            if res.population.get("inside") and not check.passed:  # worth a second look
                note = (
                    f"the image looks unlike the intended population (population check "
                    f"{score:.2f} < {limit:.2f}); the age in the file decided. Check it."
                )
                res.qc.append(QCResult("population_check", True, note, "population"))
            return False
        res.population.update(evidence="check", inside=check.passed)
        if check.passed:
            res.qc.append(check)
            return False
        return self._outside(res, check)


def _number(value: Any) -> float | None:
    """A finite float, or None (a measurement that was not possible, stored as NaN/null)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


_REPORTED_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "PhotometricInterpretation")


def available_cores() -> int:
    """The CPUs this process may run on: its affinity mask where the OS keeps one (taskset,
    cpusets), else every CPU of the machine. (A container's CPU quota is not seen: set
    `model.threads` there.)"""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _ms(t0: float, t1: float | None = None) -> float:
    return round(((t1 if t1 is not None else time.perf_counter()) - t0) * 1000.0, 3)


def layer_path(overlay: Path) -> Path:
    """Where the transparent heat layer of an overlay PNG lives (for the review page)."""
    return overlay.with_name(overlay.stem + ".layer.png")


def write_overlay(pixels: np.ndarray, cam: np.ndarray, path: Path) -> Path:
    """The model's view of the image (S, S) in grey with the CAM's positive part (h, w) in red;
    and beside it the heat alone as a transparent layer, which the review page lays over the
    image with an opacity the reviewer controls.

    The CAM is in logit units. It is scaled from its own minimum to its own maximum, so the
    overlay shows where in this image the evidence is strongest, not how strong it is (the
    probability says that; a positive call may have a CAM below 0 everywhere when its
    threshold is under 0.5).
    """
    from PIL import Image

    size = pixels.shape[::-1]
    heat = np.asarray(cam, dtype=np.float32)
    span = float(heat.max() - heat.min())
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    heat_img = Image.fromarray(heat, mode="F").resize(size, Image.Resampling.BILINEAR)
    level = np.clip(np.asarray(heat_img), 0, 1)  # (S, S)
    alpha = level * np.float32(0.5)
    # overlay = grey * (1 - alpha) + red * alpha, in 0..255: G = B = the darkened grey
    dark = np.clip(pixels, 0, 1).astype(np.float32) * (1 - alpha) * np.float32(255.0)
    rgb = np.empty((*level.shape, 3), dtype=np.uint8)
    rgb[..., 0] = np.rint(dark + alpha * np.float32(255.0))
    rgb[..., 1] = rgb[..., 2] = np.rint(dark)
    # the layer: red to yellow as the evidence rises, transparent where there is none
    layer = np.empty((*level.shape, 4), dtype=np.uint8)
    layer[..., 0] = 255
    layer[..., 1] = np.rint(np.clip(level * 1.5 - 0.5, 0, 1) * np.float32(255.0))
    layer[..., 2] = 0
    layer[..., 3] = np.rint(level * level * np.float32(255.0))  # faint where middling
    path.parent.mkdir(parents=True, exist_ok=True)
    for image, target in (
        (Image.fromarray(rgb, mode="RGB"), path),
        (Image.fromarray(layer, mode="RGBA"), layer_path(path)),
    ):
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")  # no clash
        # zlib level 1: a quarter of the default's encoding time (2 ms, not 8, per image at
        # 224 px) for files up to 40% larger (about 40 and 30 KB)
        image.save(tmp, format="PNG", compress_level=1)
        tmp.replace(target)
    return path
