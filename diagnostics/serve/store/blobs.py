"""The blob store: uploaded bytes, content-addressed on disk. A blob is written to a temp file,
fsynced and renamed (and its directory fsynced) before its study row commits."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path


class BlobStore:
    """Content-addressed files: `<root>/ab/cd/<sha256>`. Writes are atomic and durable."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        # folders whose own entry (in their parent) this process has made durable: they need
        # no fsync of their parent again. Started empty, so a folder a crashed process made
        # (and perhaps never synced) is synced again by the next one.
        self._durable: set[Path] = set()
        self._lock = threading.Lock()
        self.dir_fsyncs = 0  # for tests and profiling

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def temp_file(self) -> Path:
        return self.tmp / f"{uuid.uuid4().hex}.part"

    def commit(self, temp: Path, sha256: str) -> Path:
        """fsync `temp`, rename it to its address, fsync the directory. Idempotent.

        The file's own folder is fsynced every time (its new entry); the entries of the
        folders above it only until this process has made them durable once (a folder, once
        its entry is synced, stays), so a commit costs two fsyncs, not four."""
        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(temp, final)
        _fsync_dir(final.parent)  # the file's directory entry
        self.dir_fsyncs += 1
        # the entries of the folders above it, which this commit (or a crashed one) may have made
        for folder in (final.parent, final.parent.parent):
            with self._lock:
                known = folder in self._durable
            if known:
                continue
            _fsync_dir(folder.parent)
            self.dir_fsyncs += 1
            with self._lock:
                self._durable.add(folder)
        return final

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def remove(self, sha256: str) -> None:
        """Undo a `commit` whose row could not be written (no study refers to the file)."""
        self.path(sha256).unlink(missing_ok=True)

    def clean_temp(self, older_than_s: float = 3600.0) -> int:
        """Remove abandoned partial uploads (a crash between write and rename)."""
        n = 0
        cutoff = time.time() - older_than_s
        for f in self.tmp.glob("*.part"):
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink(missing_ok=True)
                    n += 1
            except FileNotFoundError:  # its request finished (and removed it) meanwhile
                continue
        return n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
