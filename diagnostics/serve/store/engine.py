"""Engines, migrations and retries: SQLite in WAL mode (or PostgreSQL by URL), the schema
brought up by Alembic, and lock / disk-full errors turned into StoreBusy (503) / StoreFull (507).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError

T = TypeVar("T")


class StoreBusy(RuntimeError):
    """The database stayed locked through every retry: answer 503, the client retries."""


class StoreFull(RuntimeError):
    """The database cannot grow: its disk is full (or SQLite's page limit is reached). Writes
    answer 507; reads go on."""


def _is_full_error(exc: Exception) -> bool:
    orig = getattr(exc, "orig", None) or exc
    if getattr(orig, "sqlstate", None) in ("53100", "53200"):  # PostgreSQL disk_full, out_of_memory
        return True
    msg = str(orig).lower()
    return "database or disk is full" in msg or "no space left" in msg


def make_engine(url: str, *, immediate: bool = False) -> Engine:
    """SQLite: WAL, full sync, foreign keys. With `immediate`, every transaction starts with
    BEGIN IMMEDIATE, so a writer takes the lock at once (no deadlock when a read upgrades to a
    write); readers use a plain deferred BEGIN and, in WAL mode, never wait for writers.
    PostgreSQL: a plain pool."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 5, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged commit survives power loss
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=5000")  # ms; then `retrying` backs off, then 503
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _is_lock_error(exc: OperationalError) -> bool:
    msg = str(exc.orig).lower() if exc.orig else str(exc).lower()
    return "locked" in msg or "busy" in msg or "serializ" in msg


# The Alembic scripts sit beside this package (`diagnostics/serve/migrations`, shipped as package
# data); their env.py reads `Base.metadata` from `diagnostics.serve.store`.
MIGRATIONS_DIR = Path(__file__).parent.parent / "migrations"


def migrate(engine: Engine) -> None:
    """Bring the schema to the latest Alembic revision (idempotent; safe from several processes:
    SQLite serialises on its write lock, PostgreSQL on an advisory lock)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # a dozen INFO lines per start
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(73100531)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def retrying(fn: Callable[[], T], *, attempts: int = 4) -> T:
    """Run a write transaction, retrying when SQLite reports a lock (or PostgreSQL a
    serialisation failure); StoreBusy after `attempts`."""
    delay = 0.05
    for i in range(attempts):
        try:
            return fn()
        except OperationalError as exc:
            if _is_full_error(exc):
                raise StoreFull("the database is full") from exc
            if not _is_lock_error(exc):
                raise
            if i == attempts - 1:
                raise StoreBusy("the database is busy") from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")
