"""Which precision the clinic runs: int8 or fp32. Torch-free.

The int8 file (`model.int8.onnx` beside `model.onnx`, or the registry version's int8 artefact)
is used when all of these hold:

- it exists, with the sha256 training recorded (the registry client checks it);
- its training-time gate passed (`ModelMetadata.int8_gate`: AUROC change and CAM agreement
  against fp32 on validation) and it is the quantisation of the same model (run, labels,
  thresholds and temperatures as the fp32 file's);
- this CPU has VNNI or AMX (`avx512_vnni`, `avx_vnni` or `amx_int8` in /proc/cpuinfo). Without
  them ONNX Runtime's int8 kernels are slower than fp32, and 8-bit weights can saturate the
  16-bit accumulators (`reduce_range`), so the clinic keeps fp32.

`model.precision` chooses: `auto` (the rule above), `fp32` (always), `int8` (refuse to start
unless every condition holds). Otherwise fp32 runs, and the reason is said (log, /health/ready,
`describe()`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# CPU flags with fast int8 dot products, best first
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
CPUINFO = Path("/proc/cpuinfo")

Precision = Literal["int8", "fp32"]


class PrecisionError(ValueError):
    """`model.precision: int8` asked for, and int8 cannot run here; the message says why."""


def cpu_flags(cpuinfo: str | Path | None = None) -> set[str]:
    """The CPU feature flags of the first processor listed (empty where unreadable)."""
    path = Path(cpuinfo) if cpuinfo is not None else CPUINFO
    try:
        text = path.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def int8_acceleration(flags: set[str] | None = None) -> str | None:
    """The int8 instruction set this CPU has (amx_int8 > avx512_vnni > avx_vnni), or None."""
    flags = cpu_flags() if flags is None else flags
    for name in INT8_FLAGS:
        if name in flags:
            return name
    return None


@dataclass(frozen=True)
class Choice:
    precision: Precision
    path: Path
    reason: str  # why this precision, in words


def same_model(fp32: Any, int8: Any) -> str | None:
    """None when the int8 metadata describes the same model as the fp32 file's (ModelMetadata
    of each); else what differs."""
    for key in ("name", "run_id", "labels", "temperature", "thresholds", "preprocessing"):
        if getattr(fp32, key) != getattr(int8, key):
            return f"its {key} differs from the fp32 file's"
    return None


def choose(
    mode: str,
    fp32_path: Path,
    int8_path: Path | None,
    *,
    int8_metadata: Any = None,
    fp32_metadata: Any = None,
    missing: str = "",
    flags: set[str] | None = None,
    gpu: bool = False,
) -> Choice:
    """The file to run and why. `int8_path` None: no int8 file (`missing` says why);
    `int8_metadata`: its ModelMetadata (the gate lives there); `gpu`: CUDA will run the
    model (fp32 there). Raises PrecisionError when
    `mode` is int8 and int8 cannot run."""
    if mode not in ("auto", "fp32", "int8"):
        raise ValueError(f"model.precision is auto, fp32 or int8, not {mode!r}")
    if mode == "fp32":
        return Choice("fp32", fp32_path, "model.precision is fp32")
    why: str | None = None
    isa = int8_acceleration(flags)
    if int8_path is None:
        why = f"no int8 file ({missing or 'none beside the fp32 file'})"
    elif int8_metadata is None or not int8_metadata.quantization:
        why = f"{int8_path.name} is not a quantised model"
    elif int8_metadata.int8_gate is None:
        why = "the int8 file records no accuracy gate"
    elif not int8_metadata.int8_gate.passed:
        why = f"the int8 file failed its accuracy gate ({int8_metadata.int8_gate.reason})"
    elif fp32_metadata is not None and (differs := same_model(fp32_metadata, int8_metadata)):
        why = f"the int8 file is not this model's: {differs}"
    elif gpu:
        why = "a GPU serves: the int8 file is for CPUs with VNNI or AMX"
    elif isa is None:
        why = "this CPU has no VNNI or AMX (avx512_vnni, avx_vnni, amx_int8): int8 would be slower"
    if why is None:
        assert int8_path is not None and int8_metadata.int8_gate is not None
        gate = int8_metadata.int8_gate
        return Choice(
            "int8",
            int8_path,
            f"int8 gate passed (AUROC change {gate.auroc_delta:.4f}, CAM correlation "
            f"{gate.cam_correlation:.3f}) and the CPU has {isa}",
        )
    if mode == "int8":
        raise PrecisionError(f"model.precision is int8, but {why}")
    return Choice("fp32", fp32_path, f"fp32: {why}")


def read_metadata(path: Path) -> Any:
    """A model file's ModelMetadata without building an optimised session (cheap)."""
    import onnxruntime as ort

    from diagnostics.contract import ModelMetadata

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map)
