"""A real MLflow tracking server for tests, started as users start it: `diagnostics tracking serve`.

`fresh_database()` makes a PostgreSQL database with a random name in the local server (skips the
test when it is unreachable) and drops it afterwards; `tracking_server()` runs the command on a
free loopback port and waits for /health. The database URI carries a password (the local server
trusts loopback connections and ignores it), so tests can check that it never shows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from service_support import pg_connect_or_skip

PASSWORD = f"pw-{uuid.uuid4().hex[:12]}"  # must never appear in any output
DIAGNOSTICS = Path(sys.executable).with_name("diagnostics")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database: its SQLAlchemy URI (with a password); dropped after."""
    admin = pg_connect_or_skip()
    name = f"mlflow_{uuid.uuid4().hex[:10]}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@dataclass
class TrackingServer:
    url: str
    process: subprocess.Popen
    log: Path  # what `diagnostics tracking serve` printed, mlflow's output included
    artifacts: Path  # the server's --artifacts destination

    def stop(self) -> None:
        """SIGTERM to the command's process group (the command, mlflow and its workers)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the tracking server did not start:\n{self.output()[-5000:]}")
            time.sleep(0.3)


@contextmanager
def tracking_server(db: str, root: Path, *, wait: bool = True) -> Iterator[TrackingServer]:
    """`diagnostics tracking serve` on a free port, the URI in DIAGNOSTICS_TRACKING_DB, one
    worker; stopped at the end. With `wait=False` it is yielded while it starts (call
    `wait_ready`): the caller can do something else meanwhile."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    artifacts = root / "artifacts"
    log_path = root / "server.log"
    env = {**os.environ, "DIAGNOSTICS_TRACKING_DB": db, "DIAGNOSTICS_HOME": str(root / "home")}
    for key in ("MLFLOW_TRACKING_URI", "DIAGNOSTICS_TRACKING_URI", "MLFLOW_BACKEND_STORE_URI"):
        env.pop(key, None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                *(str(DIAGNOSTICS), "tracking", "serve", "--port", str(port)),
                *("--workers", "1", "--artifacts", str(artifacts)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,  # its own process group: stopped as one
        )
    server = TrackingServer(f"http://127.0.0.1:{port}", process, log_path, artifacts)
    try:
        if wait:
            server.wait_ready()
        yield server
    finally:
        server.stop()
