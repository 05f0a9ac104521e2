"""`diagnostics tracking serve`: the team's MLflow tracking server, on PostgreSQL, with proxied
artefacts.

It runs MLflow's own server (`mlflow server`) with this project's defaults; nothing here answers
a request. The database URI comes from DIAGNOSTICS_TRACKING_DB (or `--db`, which refuses a
password: a command line is visible to every user), and reaches mlflow in its environment
(MLFLOW_BACKEND_STORE_URI), never on a command line that `ps` shows.
Everything this command prints, mlflow's own output included, has the password replaced by ***.

Trainers, reviewers and clinics then point at it: MLFLOW_TRACKING_URI=http://HOST:PORT. Their
artefacts go through the server (`--serve-artifacts`: runs log to mlflow-artifacts:/ URIs and
the server writes the files under `--artifacts`), so no client needs the server's disk.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from diagnostics.cli.common import _fail
from diagnostics.settings import redact_uri, uri_secrets

DB_ENV = "DIAGNOSTICS_TRACKING_DB"
ARTIFACTS_ENV = "DIAGNOSTICS_TRACKING_ARTIFACTS"


class DatabaseError(RuntimeError):
    """The tracking database cannot be used; the message says why (password redacted)."""


# --------------------------------------------------------------------------- URIs and secrets


def scrub(text: str, hidden: list[str]) -> str:
    for secret in hidden:
        text = text.replace(secret, "***")
    return text


def database_uri(uri: str) -> str:
    """A SQLAlchemy URI as mlflow needs it: postgres(ql):// gets the psycopg (3) driver, which
    the project installs (SQLAlchemy's default for PostgreSQL is psycopg2)."""
    scheme, sep, rest = uri.strip().partition("://")
    if sep and scheme.lower() in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    return uri.strip()


def check_database(uri: str, timeout_s: int = 5) -> None:
    """Connect once (SELECT 1), or raise `DatabaseError` with the reason and what to do."""
    import sqlalchemy as sa
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
    from sqlalchemy.pool import NullPool

    hidden = uri_secrets(uri)
    try:
        url = sa.engine.make_url(uri)
    except ArgumentError:
        raise DatabaseError(
            f"{redact_uri(uri)} is not a database URI; expected e.g. "
            "postgresql+psycopg://USER@HOST:5432/DBNAME"
        ) from None
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            folder = Path(url.database).expanduser().resolve().parent
            if not folder.is_dir():
                raise DatabaseError(f"{redact_uri(uri)}: the folder {folder} does not exist")
        return
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() in ("postgresql", "mysql"):
        connect_args["connect_timeout"] = timeout_s
    try:
        engine = sa.create_engine(url, connect_args=connect_args, poolclass=NullPool)
    except (NoSuchModuleError, ImportError) as exc:
        raise DatabaseError(
            f"{redact_uri(uri)}: no database driver for {url.drivername} ({exc}); for PostgreSQL "
            "use postgresql+psycopg:// (pip install 'psycopg[binary]')"
        ) from None
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except DBAPIError as exc:
        reason = " ".join(str(exc.orig or exc).split())
        hint = ""
        if "does not exist" in reason and url.database and f'"{url.database}"' in reason:
            hint = (
                f"; create it first (as a PostgreSQL superuser: CREATE DATABASE {url.database} "
                f"OWNER {url.username or 'USER'}); mlflow creates its tables itself"
            )
        elif "password" in reason.lower() or "authentication" in reason.lower():
            hint = "; check the user and password (PGPASSWORD, ~/.pgpass, or the URI)"
        elif "Is the server running" not in reason and (
            "refused" in reason.lower() or "timeout" in reason.lower()
        ):
            hint = "; is PostgreSQL running there, and does it accept TCP connections?"
        raise DatabaseError(
            scrub(f"cannot reach the tracking database {redact_uri(uri)}: {reason}{hint}", hidden)
        ) from None
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- the server


def server_command(
    db: str,
    artifacts: str,
    host: str,
    port: int,
    workers: int,
    allowed_hosts: str | None = None,
) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, the command line to show) that run MLflow's server. The database URI
    is in the environment only; the shown line has it, redacted, as --backend-store-uri."""
    args = [
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if allowed_hosts:
        args += ["--allowed-hosts", allowed_hosts]
    argv = [sys.executable, "-m", "mlflow", "server", *args]
    env = {k: v for k, v in os.environ.items() if k != DB_ENV}
    env["MLFLOW_BACKEND_STORE_URI"] = db
    env["PYTHONUNBUFFERED"] = "1"  # mlflow's lines come through as they are written
    # What this project does not use stays off, unless set on purpose: MLflow's job runner (for
    # GenAI scorers: eight more processes) and its usage telemetry (a clinic network).
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    shown = " ".join(["mlflow server", "--backend-store-uri", redact_uri(db), *args])
    return argv, env, shown


def _artifacts_destination(artifacts: str | None) -> str:
    """A local folder (made absolute, created) or an object-store URI, as given."""
    from diagnostics.settings import get_settings

    if artifacts and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", artifacts):
        return artifacts  # s3://, gs://, file:// ...: mlflow reads it
    folder = (
        Path(artifacts).expanduser()
        if artifacts
        else get_settings().home / "var" / "tracking-artifacts"
    )
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def allowed_host_patterns(host: str, given: str | None) -> str | None:
    """MLflow's --allowed-hosts (its Host-header check; without it: localhost and private
    addresses only). A name given without a port also matches it with any port (`name:*`:
    clients send `Host: name:5000`). Listening beyond loopback with none given: MLflow's
    defaults plus this machine's names, so that the address printed for clients works."""
    if given:
        names = [n.strip() for n in given.split(",") if n.strip()]
        extra = [f"{n}:*" for n in names if "*" not in n and ":" not in n]
        return ",".join(names + extra)
    if host in LOOPBACK_HOSTS:
        return None
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = {socket.getfqdn(), socket.gethostname()} - {""}
    if host not in ("0.0.0.0", "::", ""):
        names.add(host)
    ours = [p for n in sorted(names) for p in (n, f"{n}:*")]
    return ",".join(get_default_allowed_hosts() + ours)


def client_uri(host: str, port: int) -> str:
    """What trainers, reviewers and clinics set MLFLOW_TRACKING_URI to."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(argv: list[str], env: dict[str, str], hidden: list[str]) -> int:
    """Run the server until it exits or this process is told to stop (SIGTERM, SIGINT: passed
    on to mlflow, which stops its workers). Its output is copied to stderr, scrubbed."""
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            sys.stderr.write(scrub(raw.decode("utf-8", errors="replace"), hidden))
            sys.stderr.flush()
        code = proc.wait()
        return 0 if stopping else code
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)


def tracking_serve(
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help=f"the tracking database (SQLAlchemy URI); default: ${DB_ENV}, which keeps a "
            "password out of shell history and configs",
            show_default=False,
        ),
    ] = None,
    artifacts: Annotated[
        str | None,
        typer.Option(
            envvar=ARTIFACTS_ENV,
            help="where the server keeps artefacts: a folder, or s3://BUCKET/PATH; "
            "default <home>/var/tracking-artifacts",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="interface to listen on; 0.0.0.0 for the clinic network")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5000,
    workers: Annotated[int, typer.Option(min=1, help="server worker processes")] = 2,
    allowed_hosts: Annotated[
        str | None,
        typer.Option(
            help="host names clients may use (MLflow's --allowed-hosts; a name without a port "
            "matches any port), e.g. mlflow.hospital.vn,10.0.0.5; default: localhost, private "
            "addresses and, when listening beyond loopback, this machine's names"
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="check the database, print the command, start nothing")
    ] = False,
) -> None:
    """Run MLflow's tracking server on PostgreSQL with proxied artefacts, for the whole team.

    Trainers, reviewers and clinics point MLFLOW_TRACKING_URI at http://HOST:PORT. On an empty
    database mlflow creates its tables; after upgrading mlflow, back the database up and run
    `mlflow db upgrade` on it first (the server refuses an out-of-date schema)."""
    from diagnostics.settings import get_settings

    raw = db or get_settings().tracking_db
    if not raw:
        raise _fail(
            f"no tracking database: set {DB_ENV}=postgresql+psycopg://USER@HOST:5432/DBNAME "
            "(the password in PGPASSWORD or ~/.pgpass), or give --db"
        )
    uri = database_uri(raw)
    hidden = uri_secrets(uri)
    if db and hidden:
        raise _fail(
            "--db holds a password, which every user of this machine could read (ps, shell "
            f"history): put it in ~/.pgpass or PGPASSWORD, or set {DB_ENV} instead"
        )
    if importlib.util.find_spec("mlflow") is None:
        raise _fail(
            "the tracking server is MLflow's, and mlflow is not installed here: "
            "pip install 'diagnostics[train]'"
        )
    try:
        check_database(uri)
    except DatabaseError as exc:
        raise _fail(str(exc)) from None
    destination = _artifacts_destination(artifacts)
    allowed = allowed_host_patterns(host, allowed_hosts)
    argv, env, shown = server_command(uri, destination, host, port, workers, allowed)
    typer.echo(f"database {redact_uri(uri)} answers")
    typer.echo(f"{'command' if check else 'starting'}: {shown}")
    typer.echo(
        "  (the database URI reaches mlflow as MLFLOW_BACKEND_STORE_URI, not as an argument)"
    )
    typer.echo(f"clients: MLFLOW_TRACKING_URI={client_uri(host, port)}")
    if check:
        return
    code = run_server(argv, env, hidden)
    if code:
        raise _fail(f"the MLflow server stopped with exit code {code} (its output is above)")
