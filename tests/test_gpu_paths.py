"""GPU paths of the clinic runner (marked `gpu`: skipped by default and without CUDA).

On a machine with a CUDA device and onnxruntime-gpu: the runner asks for the CUDA execution
provider explicitly ([CUDA, CPU]), the session really runs on it (checked, not assumed), and
its probabilities match the CPU provider's. `make test` runs `-m 'not gpu'`; run these with
`.venv/bin/python -m pytest -m gpu tests/test_gpu_paths.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

CUDA = "CUDAExecutionProvider"


def _need_cuda_provider() -> None:
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        pytest.skip(
            f"onnxruntime {ort.__version__} has no {CUDA} (the CPU build, or no CUDA device): "
            "install onnxruntime-gpu on a CUDA machine to run the GPU tests"
        )


def test_runner_uses_the_cuda_provider_and_matches_cpu(cxr_model: Path) -> None:
    _need_cuda_provider()
    from diagnostics.imaging import normalize, resize_square
    from diagnostics.serve.runner import OnnxModel
    from tests.service_support import synth_pixels

    gpu = OnnxModel(cxr_model, device="cuda")
    cpu = OnnxModel(cxr_model, device="cpu")
    assert gpu.provider == CUDA and not gpu.fallback, gpu.describe()
    spec = gpu.metadata.preprocessing
    x = np.stack([normalize(resize_square(p, spec), spec) for p in synth_pixels(4, seed=3)])
    p_gpu, p_cpu = gpu.predict(x).probabilities, cpu.predict(x).probabilities
    assert np.abs(p_gpu - p_cpu).max() < 1e-3  # cuDNN convolutions are not bit-exact


def test_auto_picks_cuda_when_present(cxr_model: Path) -> None:
    _need_cuda_provider()
    from diagnostics.serve.runner import OnnxModel

    m = OnnxModel(cxr_model, device="auto")
    assert m.provider == CUDA and not m.fallback
