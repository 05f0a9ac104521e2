"""ONNX Runtime inference on a self-describing model file. Torch-free.

`OnnxModel` loads an exported file, reads its `ModelMetadata`, picks an execution provider
(CUDA when asked for and present, CPU otherwise, and says which it got), and turns preprocessed
batches into calibrated probabilities.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diagnostics.contract import ModelMetadata

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Prediction:
    logits: np.ndarray  # (B, F)
    probabilities: np.ndarray  # (B, F), calibrated
    cam: np.ndarray | None  # (B, F, h, w), logit units


class OnnxModel:
    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        threads: int | None = None,
        expected_sha256: str | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.sha256 = file_sha256(self.path)
        if expected_sha256 is not None and expected_sha256.lower() != self.sha256:
            raise ValueError(
                f"model file sha256 {self.sha256} does not match the expected {expected_sha256}"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.path), options, providers=wanted)
        self.provider = self.session.get_providers()[0]  # what ORT really uses
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            log.warning("CUDA was requested but is unavailable: running on CPU")
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ModelMetadata.from_props(props)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._temperature = np.asarray(self.metadata.temperature, dtype=np.float64)

    @property
    def labels(self) -> list[str]:
        return list(self.metadata.labels)

    def predict(self, batch: np.ndarray, *, cam: bool = False) -> Prediction:
        """`batch` (B, C, S, S) float32 from `imaging.preprocess` with this model's spec."""
        names = self.output_names if cam else ["logits"]
        outputs = self.session.run(
            names, {self.input_name: np.ascontiguousarray(batch, np.float32)}
        )
        logits = np.asarray(outputs[0], dtype=np.float64)
        z = np.clip(logits / self._temperature, -60, 60)
        probs = 1.0 / (1.0 + np.exp(-z))
        return Prediction(
            logits=logits, probabilities=probs, cam=np.asarray(outputs[1]) if cam else None
        )
