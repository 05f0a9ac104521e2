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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
