"""ONNX export of a trained CXR network, checked and self-describing.

The graph takes `image` (batch, C, S, S) float32 and returns `logits` (batch, F), `cam`
(batch, F, h, w) and `embedding` (batch, C_feat), the pooled features that input QC compares
with the training distribution; with a population head also `population` (batch,), the logit
of the model's population check. `ModelMetadata` goes into metadata_props. Parity with torch is
checked on real images through the shared numpy preprocessing; a mismatch fails the export.

The CXR training steps: `model_metadata` (what the file says about itself), `export_model`
(run_dir/model.onnx with its parity check) and `int8_variant` (model.int8.onnx, compared with
the fp32 model on the validation images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diagnostics import __version__
from diagnostics.contract import (
    METADATA_KEY,
    InputSpec,
    Int8Gate,
    ModelMetadata,
    PreprocessSpec,
    Threshold,
    calibrated_probability,
)
from diagnostics.data.cache import from_uint16
from diagnostics.imaging import load_for_model
from diagnostics.models.cxr import CAMClassifier, WithCAM
from diagnostics.train.metrics import auroc

if TYPE_CHECKING:
    from diagnostics.train.calibrate import Calibration
    from diagnostics.train.config import CXRTrainConfig
    from diagnostics.train.cxr_data import CXRData, Images
    from diagnostics.train.qc_references import QCReferences

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max |p_torch - p_onnx| on probabilities
INT8_GATE_CAM_IMAGES = 32  # validation images whose CAMs the int8 gate compares


class ExportParityError(RuntimeError):
    pass


def export_onnx(
    model: CAMClassifier, metadata: ModelMetadata, path: str | Path, *, opset: int = 17
) -> Path:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = metadata.preprocessing
    if spec is None or metadata.input is None:
        raise ValueError("a CXR export needs preprocessing and input in its metadata")
    model = model.float().eval().to(memory_format=torch.contiguous_format).cpu()
    dummy = torch.zeros(1, spec.channels, spec.size, spec.size)
    wrapper = WithCAM(model)
    outputs = wrapper.output_names()
    torch.onnx.export(
        wrapper,
        (dummy,),
        str(path),
        input_names=[metadata.input.name],
        output_names=outputs,
        dynamic_axes={metadata.input.name: {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
        opset_version=opset,
        dynamo=False,
    )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata.to_json()
    proto.producer_name = "diagnostics"
    proto.doc_string = f"{metadata.name}: {metadata.architecture} for {', '.join(metadata.labels)}"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def random_export(
    arch: str, size: int, labels: list[str], out: str | Path, seed: int = 0, name: str = "random"
) -> Path:
    """An untrained export of a registry architecture (1 channel, `size` px, fixed 0.5
    thresholds), for benchmarks and tests: seeded, so the same weights, and the same calls,
    every run. Its probabilities mean nothing clinically."""
    from diagnostics.models.registry import create_model

    torch.manual_seed(seed)
    model = create_model(arch, in_channels=1, num_classes=len(labels)).eval()
    meta = ModelMetadata(
        task="cxr",
        name=name,
        architecture=arch,
        labels=labels,
        temperature=[1.0] * len(labels),
        thresholds={f: Threshold(value=0.5, policy="fixed") for f in labels},
        preprocessing=PreprocessSpec(size=size),
        input=InputSpec(shape=["batch", 1, size, size]),
        created=datetime.now(UTC).isoformat(),
        package_version=__version__,
    )
    return export_onnx(model, meta, out)


def check_parity(model: CAMClassifier, onnx_path: str | Path, inputs: np.ndarray) -> float:
    """Max |probability| difference between torch (fp32) and ONNX Runtime on `inputs`, over
    the findings and, when there is one, the population check (as a sigmoid of its logit).

    Raises ExportParityError above PARITY_TOLERANCE.
    """
    from diagnostics.serve.runner import OnnxModel

    runner = OnnxModel(onnx_path, device="cpu")
    model = model.float().eval().cpu()
    with torch.no_grad():
        logits, population = model.forward_train(
            torch.from_numpy(np.ascontiguousarray(inputs, np.float32))
        )
    p_torch = calibrated_probability(logits.double().numpy(), runner.metadata.temperature)
    pred = runner.predict(inputs)
    diff = float(np.abs(p_torch - pred.probabilities).max())
    if population is not None:  # the population check, on the same probability scale
        if pred.population is None:
            raise ExportParityError("the exported model lost its population output")
        q_torch = calibrated_probability(population.double().numpy())
        diff = max(diff, float(np.abs(q_torch - calibrated_probability(pred.population)).max()))
    if not diff <= PARITY_TOLERANCE:
        raise ExportParityError(
            f"ONNX Runtime and torch disagree: max probability difference {diff:.2e} > "
            f"{PARITY_TOLERANCE:.0e}"
        )
    return diff


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray,
    metadata: ModelMetadata,
    *,
    batch: int = 8,
    calibrate: str = "minmax",
) -> Path:
    """Static int8 quantisation: QDQ, per-channel weights, calibrated on `calibration` inputs.

    Dynamic quantisation is never used: it turns convolutions into ConvInteger, 5-13x slower on
    these CPUs (PERFORMANCE.md). The result must be checked on held-out data by the caller.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = metadata.input.name
    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[calibrate]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            chunks = [calibration[i : i + batch] for i in range(0, len(calibration), batch)]
            self._it = iter([{name: np.ascontiguousarray(c, np.float32)} for c in chunks])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    out_path = Path(out_path)
    # Pre-processing first (PITFALLS.md): shape inference and the ONNX optimiser drop the
    # Identity nodes the exporter leaves on weights. Without it ORT fuses only 5 of ResNet-18's
    # 21 convolutions into QLinearConv and int8 ran slower than fp32 (measured: 3x faster with).
    import tempfile

    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="int8-pre-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        quantize_static(
            str(pre),
            str(out_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # uint8 activations with int8 weights: the form ORT runs fast on x86 (VNNI/AMX). Signed
            # activations measured 20 ms against 4.6 ms for ResNet-18 at 224 px, slower than fp32.
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            # Full 8-bit weights. reduce_range (7-bit) avoids the saturation of the u8 x s8 pair
            # sums on CPUs WITHOUT VNNI (AVX2 vpmaddubsw); the clinic never runs int8 there (it
            # falls back to fp32: serve/precision.py), and with VNNI/AMX it only costs accuracy.
            reduce_range=False,
        )
    proto = onnx.load(str(out_path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata.to_json()
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))
    return out_path


@dataclass
class Exported:
    metadata: ModelMetadata
    onnx_path: Path
    sha256: str
    parity: float  # max |torch - ONNX Runtime| on the parity images
    inputs: np.ndarray  # (n, C, S, S) parity images, preprocessed as the clinic does


def model_metadata(
    cfg: CXRTrainConfig,
    data: CXRData,
    cal: Calibration,
    qc: QCReferences,
    run_id: str | None,
    digest: str,
) -> ModelMetadata:
    """What the ONNX file says about itself (the clinic needs nothing else)."""
    spec = cfg.preprocess
    return ModelMetadata(
        task="cxr",
        name=cfg.tracking.registered_model or cfg.name,
        architecture=cfg.model.name,
        labels=data.findings,
        temperature=cal.temperatures,
        thresholds=cal.thresholds,
        preprocessing=spec,
        input=InputSpec(shape=["batch", spec.channels, spec.size, spec.size]),
        run_id=run_id,
        dataset_digest=digest,
        dataset_name=f"{cfg.name}:{cfg.data.source}",
        metrics=cal.flat,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        package_version=__version__,
        intended_use=cfg.intended_use,
        limitations=cfg.limitations,
        ood=qc.ood,
        population=qc.population,
    )


def export_model(
    cfg: CXRTrainConfig,
    model: torch.nn.Module,
    metadata: ModelMetadata,
    data: CXRData,
    run_dir: Path,
) -> Exported:
    """run_dir/model.onnx, checked against torch on real validation images."""
    from diagnostics.contract import file_sha256

    onnx_path = export_onnx(model.cpu(), metadata, run_dir / "model.onnx")
    # Parity on real images, through the exact numpy preprocessing the clinic uses.
    paths = data.table.frame["path"].to_numpy()[data.idx["val"][: cfg.eval.parity_images]]
    inputs = np.stack([load_for_model(p, cfg.preprocess) for p in paths])
    parity = check_parity(model, onnx_path, inputs)
    return Exported(metadata, onnx_path, file_sha256(onnx_path), parity, inputs)


def write_int8_gate(path: Path, gate: Int8Gate) -> None:
    """Record the gate in the int8 file's ModelMetadata (the graph is unchanged)."""
    import onnx

    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = ModelMetadata.from_props(props).model_copy(update={"int8_gate": gate})
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            entry.value = meta.to_json()
    onnx.save(proto, str(path))


def int8_variant(
    cfg: CXRTrainConfig, exported: Exported, data: CXRData, images: Images
) -> dict[str, Any]:
    """Static int8 model (model.int8.onnx) calibrated on training images, checked against the
    fp32 one on validation; the gate (`train.int8_gate`) is written into its metadata."""
    from diagnostics.contract import file_sha256
    from diagnostics.imaging import normalize
    from diagnostics.serve.runner import OnnxModel
    from diagnostics.train.int8_gate import evaluate_gate

    metadata, fp32_path = exported.metadata, exported.onnx_path
    cache, idx, labels = images.cache, data.idx, images.labels
    spec = cfg.preprocess
    rng = np.random.default_rng(cfg.train.seed)  # a sample of every class, not the first rows
    n = min(cfg.eval.int8_calibration_images, len(idx["train"]))
    calib_idx = np.sort(rng.choice(idx["train"], n, replace=False))
    calibration = normalize(from_uint16(cache[calib_idx]), spec)
    meta = metadata.model_copy(update={"quantization": "int8-static-qdq-per-channel"})
    path = quantize_int8(fp32_path, fp32_path.with_name("model.int8.onnx"), calibration, meta)
    fp32, q8 = OnnxModel(fp32_path), OnnxModel(path)
    p32, p8, z32, z8, c32, c8 = [], [], [], [], [], []
    val = idx["val"]
    for start in range(0, len(val), 32):
        x = normalize(from_uint16(cache[val[start : start + 32]]), spec)
        cam = start < INT8_GATE_CAM_IMAGES  # the heatmaps of a sample of validation images
        r32, r8 = fp32.predict(x, cam=cam), q8.predict(x, cam=cam)
        p32.append(r32.probabilities)
        p8.append(r8.probabilities)
        if cam and r32.cam is not None and r8.cam is not None:
            c32.append(r32.cam[: INT8_GATE_CAM_IMAGES - start])
            c8.append(r8.cam[: INT8_GATE_CAM_IMAGES - start])
        if r32.population is not None and r8.population is not None:
            z32.append(r32.population)
            z8.append(r8.population)
    a, b = np.concatenate(p32), np.concatenate(p8)
    y = labels[val]
    gate = evaluate_gate(
        y,
        a,
        b,
        list(metadata.labels),
        np.concatenate(c32) if c32 else None,
        np.concatenate(c8) if c8 else None,
    )
    del q8  # the session holds the file open on some systems
    write_int8_gate(path, gate)
    log.info("int8 gate: %s", gate.reason)
    out: dict[str, Any] = {
        "path": str(path),
        "sha256": file_sha256(path),  # after the gate was written: the file as registered
        "max_prob_diff": float(np.abs(a - b).max()),
        "gate": gate.reason,  # "passed" or "failed:<why>" (MLflow tag int8_gate)
        "gate_passed": float(gate.passed),
        "gate_auroc_delta": gate.auroc_delta,
        "gate_cam_correlation": gate.cam_correlation,
        "gate_same_peak": gate.same_peak,
        "gate_n_cam": float(gate.n_cam),
    }
    out["mean_prob_diff"] = float(np.abs(a - b).mean())
    for i, f in enumerate(metadata.labels):
        out[f"val.{f}.auroc"] = auroc(y[:, i], b[:, i])
        out[f"val.{f}.auroc_delta"] = out[f"val.{f}.auroc"] - auroc(y[:, i], a[:, i])
        thr = metadata.thresholds[f].value
        # validation images whose positive/negative call differs between fp32 and int8
        out[f"val.{f}.decision_flips"] = float(((a[:, i] >= thr) != (b[:, i] >= thr)).sum())
    check = metadata.population.check if metadata.population else None
    if check is not None and z32:  # the population check keeps its fp32 threshold
        c32, c8 = np.concatenate(z32) >= check.threshold, np.concatenate(z8) >= check.threshold
        out["val.population.decision_flips"] = float((c32 != c8).sum())
    return out
