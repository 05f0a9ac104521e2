"""Process-wide settings from the environment (DIAGNOSTICS_*). Nothing is read at import time."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

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

    tracking_db: str | None = Field(
        None,
        description="`diagnostics tracking serve`: the tracking server's database (SQLAlchemy "
        "URI, e.g. postgresql+psycopg://mlflow@db-host/mlflow). An environment variable, so that "
        "no password goes into a committed config; better still, keep the password out of the "
        "URI (PGPASSWORD or ~/.pgpass, which libpq reads)",
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


_QUERY_PASSWORD = re.compile(r"(?i)((?:^|[?&;])password=)([^&;]*)")


def redact_uri(uri: str) -> str:
    """`uri` with its password, in the authority (user:PASSWORD@host) or a `password=`
    parameter, shown as ***: what may be printed or logged of a database or tracking URI."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return _QUERY_PASSWORD.sub(r"\1***", uri)
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        if ":" in userinfo:
            authority = f"{userinfo.split(':', 1)[0]}:***@{host}"
    tail = _QUERY_PASSWORD.sub(r"\1***", tail)
    return f"{scheme}://{authority}{slash}{tail}"


def uri_secrets(uri: str) -> list[str]:
    """The password(s) in `uri`, as written and percent-decoded: what output must never show."""
    found: list[str] = []
    _, sep, rest = uri.partition("://")
    authority = rest.partition("/")[0] if sep else ""
    if "@" in authority and ":" in authority.rsplit("@", 1)[0]:
        found.append(authority.rsplit("@", 1)[0].split(":", 1)[1])
    found += [m.group(2) for m in _QUERY_PASSWORD.finditer(uri)]
    out = {s for p in found if p for s in (p, unquote(p))}
    return sorted(out, key=len, reverse=True)  # longest first: no partial replacement


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
