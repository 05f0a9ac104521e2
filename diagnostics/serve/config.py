"""The clinic service's configuration (`configs/serve.yaml`), typed. Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from diagnostics.serve.qc import QCConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    # A path to an exported .onnx file, or models:/NAME@ALIAS: resolved by the CLI over the
    # tracking server's REST API (serve/registry_client.py), or with mlflow for a local store.
    path: str = "models:/cxr-demo/latest"
    sha256: str | None = Field(None, description="refuse to start unless the file has this hash")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = ORT default")
    batch_size: int = Field(8, ge=1)
    # How often to check a registry alias for a new version (0 = only on the admin call).
    refresh_s: float = Field(60.0, ge=0)


class LimitsSection(_Strict):
    max_upload_mb: float = Field(64.0, gt=0, description="larger uploads get 413, mid-stream")
    max_queue: int = Field(1000, ge=1, description="queued+running jobs before 503")
    rate_per_minute: int = Field(120, ge=1, description="uploads per clinic per minute (429)")
    disk_reserve_mb: float = Field(1024.0, ge=0, description="free space kept; below it 507")
    # Any other request body (a review as JSON, a review-page form): read before any key is
    # checked, so it is capped (413) before it is parsed.
    max_body_kb: float = Field(256.0, gt=0)


class TimeoutsSection(_Strict):
    """Limits on slow or stalled clients (see serve/server.py)."""

    headers_s: float = Field(10.0, gt=0, description="a request's headers, from the first byte")
    body_idle_s: float = Field(30.0, gt=0, description="longest pause inside a request body")
    # A whole body: 64 MB over a 1 Mbit/s clinic link takes about 9 minutes.
    body_total_s: float = Field(900.0, gt=0)
    keep_alive_s: float = Field(5.0, gt=0, description="an idle connection between requests")


class PrivacySection(_Strict):
    # Uploaded file names often hold patient names ("NGUYEN_VAN_A_1975.dcm"): not kept unless a
    # site turns this on. Files are stored by content hash either way.
    store_filenames: bool = False


class WorkerSection(_Strict):
    in_process: bool = True  # False: run `diagnostics worker` separately
    lease_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    poll_s: float = Field(0.5, gt=0)
    retry_delay_s: float = Field(5.0, ge=0)


class ReviewSection(_Strict):
    # Secure cookies are only sent over HTTPS (browsers also allow them on localhost). Turn off
    # only for plain HTTP on a test machine.
    secure_cookies: bool = True
    session_hours: float = Field(8.0, gt=0)
    default_language: Literal["vi", "en"] = "vi"
    # Sites whose reviewers record their own impression before the AI result is shown.
    independent_impression_clinics: list[str] = Field(default_factory=list)


class MonitorSection(_Strict):
    """Per site and day: the share of studies refused or flagged as outside the model's
    population or training distribution. A sudden rise means a site is sending patients the
    model was not made for (a new ward, a new machine, adults sent to a paediatric model)."""

    # Alert when a site's share for the day reaches this, over at least `min_studies`.
    alert_share: float = Field(0.2, gt=0.0, le=1.0)
    min_studies: int = Field(10, ge=1)
    days: int = Field(14, ge=1, le=366, description="days shown on the agreement page")


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Empty: SQLite (WAL) at <home>/serve/service.db. PostgreSQL: postgresql+psycopg://...
    database_url: str = ""
    data_dir: str = Field("", description="blobs and heatmaps; empty: <home>/serve")
    auth: bool = True  # off only with --dev on a loopback address
    model: ModelSection = Field(default_factory=ModelSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    worker: WorkerSection = Field(default_factory=WorkerSection)
    qc: QCConfig = Field(default_factory=QCConfig)
    review: ReviewSection = Field(default_factory=ReviewSection)
    monitor: MonitorSection = Field(default_factory=MonitorSection)
    timeouts: TimeoutsSection = Field(default_factory=TimeoutsSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    # The interactive API docs (/docs, /openapi.json) describe every route to anyone: off unless
    # a site wants them (e.g. on a test machine).
    api_docs: bool = False

    def resolved_data_dir(self, home: Path) -> Path:
        return Path(self.data_dir) if self.data_dir else home / "serve"

    def resolved_database_url(self, home: Path) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.resolved_data_dir(home) / 'service.db').resolve()}"


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_auth_setting(cfg: ServeConfig, dev: bool) -> None:
    """Authentication may be off only on a loopback address, with the explicit dev flag."""
    if cfg.auth:
        return
    if not dev or cfg.host not in LOOPBACK:
        raise ValueError(
            "authentication is off: the service starts that way only on a loopback address "
            "(127.0.0.1, localhost, ::1) with --dev"
        )
