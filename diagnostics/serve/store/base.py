"""The store's plumbing: its engines (one for reads; for SQLite, one that begins every write
transaction IMMEDIATE), read sessions, retried write transactions, and the blob store."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from diagnostics.serve.store.blobs import BlobStore
from diagnostics.serve.store.engine import (
    StoreBusy,
    StoreFull,
    T,
    _is_full_error,
    _is_lock_error,
    make_engine,
    migrate,
    retrying,
)

# How long a writer of this process waits for the others of this process (SQLite)
WRITE_LOCK_WAIT_S = 20.0


class StoreBase:
    """What every part of `Store` builds on: `session()` to read, `write(fn)` to write."""

    def __init__(self, url: str, blob_root: str | Path) -> None:
        self.url = url
        self.engine = make_engine(url)  # reads
        self.write_engine = (
            make_engine(url, immediate=True) if url.startswith("sqlite") else (self.engine)
        )
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.write_sessions = sessionmaker(self.write_engine, expire_on_commit=False)
        self.blobs = BlobStore(blob_root)
        self.full_at: float | None = None  # when a write last found the database full
        # SQLite has one writer at a time. Its busy handler sleeps and polls (1, 2, 5, ... up
        # to 100 ms between tries), so a writer that waits for another thread of this process
        # would wake long after the lock is free. Writers of this process queue on this lock
        # instead, woken the moment the previous commit ends; the busy handler is left to
        # other processes. PostgreSQL: no lock (row locks, SKIP LOCKED).
        self._write_lock: threading.RLock | None = (
            threading.RLock() if url.startswith("sqlite") else None
        )

    @property
    def full(self) -> bool:
        """A write found the database full in the last minute. (A later write that needed no
        new page proves nothing, so only time clears it.)"""
        return self.full_at is not None and time.monotonic() - self.full_at < 60.0

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> None:
        migrate(self.write_engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read-only transaction. A lock error (rare in WAL mode) becomes StoreBusy (503)."""
        try:
            with self.sessions.begin() as s:
                yield s
        except OperationalError as exc:
            if _is_lock_error(exc):
                raise StoreBusy("the database is busy") from exc
            if _is_full_error(exc):
                raise StoreFull("the database is full") from exc
            raise

    def write(self, fn: Callable[[Session], T]) -> T:
        """Run `fn` in one write transaction, retried on a locked database."""

        def attempt() -> T:
            if self._write_lock is None:
                with self.write_sessions.begin() as s:
                    return fn(s)
            # bounded: behind another process's long write, a queue of this process's writers
            # must still end in StoreBusy (503) in about the time one would, never pile up
            if not self._write_lock.acquire(timeout=WRITE_LOCK_WAIT_S):
                raise StoreBusy("the database is busy")
            try:
                with self.write_sessions.begin() as s:
                    return fn(s)
            finally:
                self._write_lock.release()

        try:
            return retrying(attempt)
        except StoreFull:
            self.full_at = time.monotonic()
            raise

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()
        self.write_engine.dispose()
