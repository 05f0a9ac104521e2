"""The clinic service's configuration (`configs/serve.yaml`), typed. Torch-free."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from diagnostics.serve.qc import QCConfig

RISK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Strict):
    # A path to an exported .onnx file, or models:/NAME@ALIAS: resolved by the CLI over the
    # tracking server's REST API (serve/registry_client.py), or with mlflow for a local store.
    path: str = "models:/cxr-demo/latest"
    sha256: str | None = Field(None, description="refuse to start unless the file has this hash")
    # A local model.int8.onnx runs only as pinned as the fp32 file: with `sha256` set, only when
    # this pins it (a registry twin is checked against the version's onnx_int8_sha256 tag).
    int8_sha256: str | None = Field(None, description="the int8 twin's sha256, for a local file")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = ORT default")
    batch_size: int = Field(8, ge=1)
    # How often to check a registry alias for a new version (0 = only on the admin call).
    refresh_s: float = Field(60.0, ge=0)
    # int8 or fp32 (serve/precision.py). auto: the int8 file when it exists (model.int8.onnx
    # beside the file, or the registry version's int8 artefact, sha256-checked), passed its
    # training-time accuracy gate, and the CPU has VNNI or AMX; else fp32, saying why.
    # int8: refuse to start unless all of that holds. fp32: never int8.
    precision: Literal["auto", "fp32", "int8"] = "auto"


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
    # How many scoring processes share this machine's cores (the in-process worker counts as
    # one). With `model.threads: 0` each takes max(1, cores // per_host) ONNX Runtime intra-op
    # threads, so that N workers do not each start a thread per core. `diagnostics worker
    # --workers-per-host N` (or DIAGNOSTICS_WORKERS_PER_HOST) overrides it.
    per_host: int = Field(1, ge=1, le=1024)
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


class TriageSection(_Strict):
    """The worklist puts AI-positive studies first. A study the AI called negative still rises
    to the top once it has waited `max_wait_minutes` unreviewed, so that a false negative is
    never read last. Per site: `clinics: {hd-01: 60}`."""

    max_wait_minutes: float = Field(240.0, gt=0)
    clinics: dict[str, float] = Field(default_factory=dict)

    def wait_for(self, clinic: str) -> float:
        return float(self.clinics.get(clinic, self.max_wait_minutes))


class StudiesSection(_Strict):
    # A study is scored once no new image has come for this long (Orthanc's "stable study"),
    # or at once when the HTTP API marks it complete.
    quiet_period_s: float = Field(30.0, ge=0)
    max_instances: int = Field(32, ge=1, description="images in one study; more are refused")


class DicomCaller(_Strict):
    """A calling AE title the receiver accepts: the DICOM equivalent of a clinic's API key."""

    clinic: str


class DicomDestination(_Strict):
    """Where a clinic's results go: its PACS by C-STORE, and optionally by STOW-RS."""

    ae_title: str = ""
    host: str = ""
    port: int = Field(0, ge=0, le=65535)
    stow_url: str = ""  # e.g. http://pacs:8042/dicom-web (STOW-RS: POST {stow_url}/studies)
    # Optional HTTP basic credentials for the STOW-RS endpoint, read from these environment
    # variables (never put the secret itself in a committed config).
    stow_user_env: str = ""
    stow_password_env: str = ""


class DicomExportSection(_Strict):
    """Bounded retries: attempt k waits backoff_s * 2**(k-1), at most max_backoff_s, then the
    object stops as failed (`diagnostics dicom resend` sends it again)."""

    enabled: bool = True
    max_attempts: int = Field(5, ge=1)
    backoff_s: float = Field(10.0, ge=0)
    max_backoff_s: float = Field(600.0, ge=0)
    timeout_s: float = Field(30.0, gt=0, description="connect and network timeout per send")
    poll_s: float = Field(1.0, gt=0)
    heatmaps: bool = True  # a secondary capture per positive finding


class DicomSection(_Strict):
    """The DICOM network edge: a C-ECHO/C-STORE receiver (started by `serve` when enabled, or
    alone by `diagnostics dicom receive`), and results sent back to each clinic's PACS."""

    enabled: bool = False
    ae_title: str = Field("DIAGNOSTICS", min_length=1, max_length=16)
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    max_associations: int = Field(10, ge=1)
    max_pdu_bytes: int = Field(65536, ge=4096, le=1048576)
    network_timeout_s: float = Field(60.0, gt=0)
    # calling AE title -> clinic. An unknown caller's association is rejected.
    callers: dict[str, DicomCaller] = Field(default_factory=dict)
    # clinic -> its PACS. A clinic without one gets no results back over DICOM.
    destinations: dict[str, DicomDestination] = Field(default_factory=dict)
    export: DicomExportSection = Field(default_factory=DicomExportSection)


class RiskModelEntry(_Strict):
    # An exported risk .onnx file, or models:/NAME@ALIAS (resolved once, at start).
    path: str
    sha256: str | None = Field(None, description="refuse to start unless the file has this hash")


RESERVED_RISK_NAMES = ("records", "agreement", "models")


class RiskSection(_Strict):
    """Risk models the clinic scores records with (`POST /v1/risk/{name}`), by the name the
    API uses: `models: {dengue_vn: {path: models:/risk-dengue-vn@champion}}`."""

    models: dict[str, RiskModelEntry] = Field(default_factory=dict)
    max_records: int = Field(100, ge=1, le=10000, description="records in one request")

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, RiskModelEntry]) -> dict[str, RiskModelEntry]:
        for name in v:
            if not RISK_NAME.fullmatch(name) or name in RESERVED_RISK_NAMES:
                raise ValueError(
                    f"risk model name {name!r}: lower-case letters, digits, '_' or '-', and "
                    f"not one of {', '.join(RESERVED_RISK_NAMES)}"
                )
        return v


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
    studies: StudiesSection = Field(default_factory=StudiesSection)
    triage: TriageSection = Field(default_factory=TriageSection)
    dicom: DicomSection = Field(default_factory=DicomSection)
    risk: RiskSection = Field(default_factory=RiskSection)
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
