"""Shared fixtures. Real third-party data lives in ../shared/data; tests needing it skip without."""

from __future__ import annotations

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
