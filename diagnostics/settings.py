"""Process-wide settings from the environment (DIAGNOSTICS_*). Nothing is read at import time."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIAGNOSTICS_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.cwd() / ".diagnostics",
        description="where demo data, runs and the local stores live",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else SQLite under home/var",
    )

    def mlflow_uri(self) -> str:
        """The tracking store: this setting, then MLFLOW_TRACKING_URI, then home/var/mlflow.db."""
        import os

        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{(self.home / 'var' / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path:
        """Where a local store keeps run artefacts (used when it creates an experiment)."""
        return self.home / "var" / "mlartifacts"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
