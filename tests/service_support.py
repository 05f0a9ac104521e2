"""Helpers for the service tests: inputs (good and bad), a real uvicorn server, PostgreSQL."""

from __future__ import annotations

import io
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


# --------------------------------------------------------------------------- inputs


def synth_pixels(n: int, seed: int = 100, size: int = 64) -> list[np.ndarray]:
    """Synthetic chest images (S, S) in [0, 1], from the generator the fixture model knows."""
    from diagnostics.data.synthetic import SynthSpec, generate

    return [img.pixels for _, img, _ in generate(n, SynthSpec(size=size), seed)]


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def dicom_bytes(pixels: np.ndarray, uid_seed: str | None = None, **changes: Any) -> bytes:
    from diagnostics.data.synthetic import dicom_dataset, to_stored

    ds = dicom_dataset(
        to_stored(pixels, 12, "MONOCHROME2"),
        bits=12,
        photometric="MONOCHROME2",
        uid_seed=uid_seed or uuid.uuid4().hex,
    )
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit grey) with almost no data after it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def colour_photo() -> bytes:
    """A real colour photograph: Grace Hopper's portrait (public domain), which matplotlib ships
    as sample data. Read from the installed package, never copied into the repository."""
    import matplotlib

    return (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()


# --------------------------------------------------------------------------- server


@dataclass
class Service:
    url: str
    store: Any
    app: Any
    data_dir: Path
    submitter: str  # API keys
    other_clinic: str
    reviewer: str
    admin: str

    def headers(self, key: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}", **extra}

    def upload(
        self,
        data: bytes,
        *,
        key: str | None = None,
        filename: str = "image.dcm",
        content_type: str = "application/dicom",
        **headers: str,
    ) -> Any:
        import httpx

        return httpx.post(
            f"{self.url}/v1/studies",
            files={"file": (filename, data, content_type)},
            headers=self.headers(key or self.submitter, **headers),
            timeout=60,
        )

    def get(self, path: str, key: str | None = None) -> Any:
        import httpx

        return httpx.get(
            f"{self.url}{path}", headers=self.headers(key or self.submitter), timeout=60
        )

    def wait(self, study_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Poll until the study reaches a final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            doc = self.get(f"/v1/studies/{study_id}").json()
            if doc["status"] in ("scored", "failed_qc", "failed"):
                return doc
            time.sleep(0.05)
        raise TimeoutError(f"study {study_id} still {doc['status']}")

    def wait_stored(self, study_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """`wait` through the store: for a study of any clinic."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.store.get_study(study_id).status in ("scored", "failed_qc", "failed"):
                return self.store.study_view(study_id)
            time.sleep(0.05)
        raise TimeoutError(f"study {study_id} not final")


def serve_config(model_path: Path, data_dir: Path, database_url: str = "", **sections: Any):
    from diagnostics.serve.config import ServeConfig

    base: dict[str, Any] = {
        "database_url": database_url,
        "data_dir": str(data_dir),
        "model": {"path": str(model_path), "device": "cpu", "batch_size": 8},
        "limits": {"max_upload_mb": 8, "disk_reserve_mb": 0, "rate_per_minute": 100000},
        "worker": {"poll_s": 0.05, "retry_delay_s": 0.1, "lease_s": 30},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return ServeConfig.model_validate(base)


@contextmanager
def running_service(
    cfg: Any, model_source: Any = None, risk_models: dict[str, Any] | None = None
) -> Iterator[Service]:
    """The real app under a real uvicorn server on a free loopback port, in a thread."""
    import uvicorn

    from diagnostics.serve.app import create_app
    from diagnostics.serve.runner import OnnxModel
    from diagnostics.serve.server import uvicorn_config
    from diagnostics.serve.store import Store

    data_dir = Path(cfg.data_dir)
    store = Store(cfg.resolved_database_url(data_dir.parent), data_dir / "blobs")
    store.migrate()
    if cfg.model.path.startswith("models:/"):
        from diagnostics.cli import resolve_model_ref

        path, version = resolve_model_ref(cfg.model.path)
        model = OnnxModel(path, device=cfg.model.device, version=version)
    else:
        model = OnnxModel(cfg.model.path, device=cfg.model.device)
    app = create_app(cfg, model, store, data_dir, model_source, risk_models)
    server = uvicorn.Server(uvicorn_config(app, cfg, host="127.0.0.1", port=0))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    keys = {
        "submitter": store.create_key("submitter", clinic="clinic-a")[1],
        "other_clinic": store.create_key("submitter", clinic="clinic-b")[1],
        "reviewer": store.create_key("reviewer", scope=["clinic-a"])[1],
        "admin": store.create_key("admin")[1],
    }
    try:
        yield Service(f"http://127.0.0.1:{port}", store, app, data_dir, **keys)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        store.close()


# --------------------------------------------------------------------------- PostgreSQL


PG_ADMIN = "host=127.0.0.1 port=5432 dbname=test user=postgres"


def pg_connect_or_skip() -> Any:
    """An autocommit psycopg connection to the local PostgreSQL `test` database; skip the test
    with the reason where the server is not reachable."""
    try:
        import psycopg

        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except Exception as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 (db test) is not reachable: {exc}")


def pg_schema_url() -> Iterator[str]:
    """A fresh schema in the local PostgreSQL `test` database, dropped afterwards; skip if the
    server is not reachable."""
    conn = pg_connect_or_skip()
    schema = f"t_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
        conn.close()


# --------------------------------------------------------------------------- without HTTP


def ingest_direct(cfg: Any, store: Any, data: bytes, *, clinic: str = "clinic-a") -> Any:
    """One upload through the path every way in shares (`intake.ingest`: format and QC checks,
    the fsynced blob, the rows and the job), without HTTP: for tests that queue many studies,
    where uploads would take longer than the scoring. A new single-image study, queued at once
    as an HTTP upload's is. Returns the `Intake`."""
    import hashlib

    from diagnostics.serve.intake import ingest
    from diagnostics.serve.upload import ReceivedFile

    temp = store.blobs.temp_file()
    temp.write_bytes(data)
    got = ReceivedFile(temp, len(data), hashlib.sha256(data).hexdigest(), data[:132], "x.png")
    return ingest(cfg, store, got, clinic=clinic, actor="test", source="http")
