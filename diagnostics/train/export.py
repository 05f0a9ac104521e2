"""ONNX export of a trained CXR network, checked and self-describing.

The graph takes `image` (batch, C, S, S) float32 and returns `logits` (batch, F), `cam`
(batch, F, h, w) and `embedding` (batch, C_feat), the pooled features that input QC compares
with the training distribution; with a population head also `population` (batch,), the logit
of the model's population check. `ModelMetadata` goes into metadata_props. Parity with torch is
checked on real images through the shared numpy preprocessing; a mismatch fails the export.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from diagnostics.contract import METADATA_KEY, ModelMetadata, calibrated_probability
from diagnostics.models.cxr import CAMClassifier, WithCAM

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max |p_torch - p_onnx| on probabilities


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
    quantize_static(
        str(fp32_path),
        str(out_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        # uint8 activations with int8 weights: the form ORT runs fast on x86 (VNNI/AMX). Signed
        # activations measured 20 ms against 4.6 ms for ResNet-18 at 224 px, slower than fp32.
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
    )
    proto = onnx.load(str(out_path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata.to_json()
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))
    return out_path
