"""Shared fixtures. Real third-party data lives in ../shared/data; tests needing it skip without."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{'/'.join(parts)} (real third-party data), absent here")
    return path


@pytest.fixture(scope="session")
def synth_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic PNG dataset with its manifest (written once per session)."""
    from diagnostics.data.synthetic import write_dataset

    out = tmp_path_factory.mktemp("synth_png")
    return write_dataset(out, 40, size=64, seed=3)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh DIAGNOSTICS_HOME (runs, caches, and the SQLite MLflow store) for one test."""
    from diagnostics.settings import get_settings

    monkeypatch.setenv("DIAGNOSTICS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def tiny_cxr_config(
    manifest: Path,
    *,
    name: str,
    size: int,
    width: int = 4,
    blocks: int = 2,
    val: float = 0.4,
    train: dict | None = None,
    tracking: dict | None = None,
):
    """A tiny-CNN training config on a manifest: CPU, no bootstrap, a few parity images."""
    from diagnostics.train.config import CXRTrainConfig

    return CXRTrainConfig.model_validate(
        {
            "name": name,
            "data": {
                "source": "manifest",
                "labels_file": str(manifest),
                "split": {"fractions": {"train": 1 - val, "val": val}},
            },
            "model": {"name": "tiny_cnn", "options": {"width": width, "blocks": blocks}},
            "preprocess": {"size": size},
            "train": {"threads": 2, **(train or {})},
            "eval": {"bootstrap": 0, "parity_images": 2},
            "tracking": tracking or {"registered_model": None},
        }
    )


@contextmanager
def diagnostics_home(path: Path) -> Iterator[Path]:
    """DIAGNOSTICS_HOME (runs, MLflow store) at `path` for a block longer than one test."""
    import os

    from diagnostics.settings import get_settings

    before = os.environ.get("DIAGNOSTICS_HOME")
    os.environ["DIAGNOSTICS_HOME"] = str(path)
    get_settings.cache_clear()
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("DIAGNOSTICS_HOME", None)
        else:
            os.environ["DIAGNOSTICS_HOME"] = before
        get_settings.cache_clear()


@pytest.fixture(scope="session")
def cxr_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ONNX CXR model exported by the project: tiny CNN, synthetic 64 px images, CPU.

    Trained once per session in its own home (MLflow store included), with its OOD reference.
    """
    from diagnostics.data.synthetic import write_dataset
    from diagnostics.train.cxr import train_cxr

    root = tmp_path_factory.mktemp("cxr_model")
    manifest = write_dataset(root / "data", 160, size=64, seed=11)
    cfg = tiny_cxr_config(
        manifest,
        name="fixture",
        size=64,
        width=8,
        blocks=3,
        val=0.3,
        train={"epochs": 3, "batch_size": 16, "lr": 0.003},
        tracking={"experiment": "fixture", "registered_model": None},
    )
    with diagnostics_home(root / "home"):
        return train_cxr(cfg, progress=False).onnx_path


def with_population(cfg, outside_manifest: Path, **check):
    """The config with an intended population (ages 1 to 5 years) and a population check
    trained against `outside_manifest`'s images."""
    from diagnostics.train.config import PopulationConfig

    population = PopulationConfig.model_validate(
        {
            "age_years": [1, 6],
            "description": "synthetic standard-habitus chests",
            "check": {"outside": {"labels_file": str(outside_manifest)}, **check},
        }
    )
    return cfg.model_copy(update={"population": population})


@pytest.fixture(scope="session")
def population_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real exported model with an intended population (ages 1 to 5 years) and a population
    check: synthetic standard-habitus chests inside, broad-habitus ones outside. CPU, 64 px."""
    from diagnostics.data.synthetic import write_dataset
    from diagnostics.train.cxr import train_cxr

    root = tmp_path_factory.mktemp("population_model")
    inside = write_dataset(root / "inside", 160, size=64, seed=21)
    outside = write_dataset(root / "outside", 80, size=64, seed=22, habitus="broad")
    cfg = tiny_cxr_config(
        inside,
        name="population",
        size=64,
        width=8,
        blocks=3,
        val=0.3,
        train={"epochs": 4, "batch_size": 16, "lr": 0.003},
        tracking={"experiment": "population", "registered_model": None},
    )
    cfg = with_population(cfg, outside, max_inside_refused=0.02)
    with diagnostics_home(root / "home"):
        return train_cxr(cfg, progress=False).onnx_path
