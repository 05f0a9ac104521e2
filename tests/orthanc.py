"""A real Orthanc PACS for tests: a throwaway configuration, database and log under a tmp folder.

Debian's Orthanc 1.10 (`make test` installs the `orthanc` package as root). The HTTP server
cannot be bound to the loopback interface in 1.10 (`HttpBindAddresses` came later), so it
refuses remote clients instead (`RemoteAccessAllowed: false`); the DICOM port listens on all
interfaces and only loopback modalities are configured.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ORTHANC: str | None = shutil.which("Orthanc") or (
    "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None
)


def orthanc_missing_reason() -> str | None:
    """Why a real Orthanc cannot run here, or None: for `pytest.mark.skipif`."""
    if ORTHANC is None:
        return "Orthanc is not installed (Debian package orthanc; `make test` installs it as root)"
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS may hand it out again later: use it at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc, with the few REST calls the tests need."""

    url: str
    aet: str
    dicom_port: int
    http_port: int
    log: Path
    process: subprocess.Popen[bytes]

    def _post(self, path: str, body: Any, timeout: float = 30) -> httpx.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(f"{self.url}{path}", content=data, timeout=timeout)
        r.raise_for_status()
        return r

    def get(self, path: str, timeout: float = 30) -> Any:
        r = httpx.get(f"{self.url}{path}", timeout=timeout)
        r.raise_for_status()
        return r.json()

    def upload(self, data: bytes) -> str:
        """Store one DICOM file through REST; its Orthanc instance id."""
        return str(self._post("/instances", data).json()["ID"])

    def instances(self) -> list[str]:
        return list(self.get("/instances"))

    def studies(self) -> list[str]:
        return list(self.get("/studies"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Tags by keyword ({"SOPInstanceUID": "1.2...", ...})."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        r = httpx.get(f"{self.url}/instances/{instance_id}/file", timeout=30)
        r.raise_for_status()
        return r.content

    def find_by(self, tag_name: str, value: str) -> list[str]:
        """Instance ids whose tag `tag_name` (a keyword) matches `value` (wildcards allowed)."""
        query = {"Level": "Instance", "Query": {tag_name: value}}
        return list(self._post("/tools/find", query).json())

    def send_to_modality(
        self, modality: str, resources: list[str], timeout: float = 60
    ) -> dict[str, Any]:
        """C-STORE `resources` (any level's ids) to a configured modality; Orthanc's answer."""
        body = {"Resources": resources, "Synchronous": True}
        return dict(self._post(f"/modalities/{modality}/store", body, timeout).json())

    def echo(self, modality: str) -> bool:
        """C-ECHO a configured modality."""
        r = httpx.post(f"{self.url}/modalities/{modality}/echo", content=b"{}", timeout=30)
        return r.status_code == 200

    def wait_for_instances(
        self, expected: int | Callable[[list[str]], bool], timeout: float = 30
    ) -> list[str]:
        """Poll /instances until there are `expected` of them (or the predicate holds)."""
        ok = expected if callable(expected) else (lambda ids: len(ids) >= expected)
        deadline = time.monotonic() + timeout
        while True:
            ids = self.instances()
            if ok(ids):
                return ids
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc holds {len(ids)} instances, not {expected}")
            time.sleep(0.1)


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def run_orthanc(
    tmp: Path,
    *,
    aet: str = "ORTHANC",
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    config: Mapping[str, Any] | None = None,
    start_timeout: float = 30,
    graceful: bool = True,
) -> Iterator[Orthanc]:
    """Start Orthanc with everything under `tmp`; `modalities`: name -> (AET, host, port);
    `config`: more configuration keys (they win). On exit Orthanc is stopped by SIGTERM (a
    clean stop takes 1.10 about 3 s), or killed at once when not `graceful`."""
    if ORTHANC is None:
        raise RuntimeError(orthanc_missing_reason())
    tmp = Path(tmp)
    for sub in ("storage", "temp"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    cfg: dict[str, Any] = {
        "Name": f"test-{aet}",
        "StorageDirectory": str(tmp / "storage"),
        "IndexDirectory": str(tmp / "storage"),
        "TemporaryDirectory": str(tmp / "temp"),
        "Plugins": [],  # Debian's default config loads /usr/share/orthanc/plugins/: not here
        "LuaScripts": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {name: list(m) for name, m in (modalities or {}).items()},
        "DicomAssociationCloseDelay": 0,  # release an SCU association as soon as a job ends
        "StableAge": 1,
        "ConcurrentJobs": 2,
        "SaveJobs": False,
    }
    cfg.update(config or {})
    config_path = tmp / "orthanc.json"
    config_path.write_text(json.dumps(cfg, indent=2))
    log = tmp / "orthanc.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [ORTHANC, str(config_path)], stdout=out, stderr=subprocess.STDOUT, cwd=tmp
        )
    server = Orthanc(f"http://127.0.0.1:{http_port}", aet, dicom_port, http_port, log, process)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{_log_tail(log)}")
            try:
                if httpx.get(f"{server.url}/system", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Orthanc did not answer in {start_timeout} s:\n{_log_tail(log)}"
                )
            time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            if graceful:
                process.terminate()
            else:
                process.kill()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
