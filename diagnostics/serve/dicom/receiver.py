"""The DICOM receiver: a pynetdicom SCP answering C-ECHO and C-STORE.

Each accepted instance goes through `intake.ingest`, the one path every way in shares, and is
acknowledged (0x0000) only once its blob is fsynced and its rows committed: a sender that saw
success can forget the instance. Calling AE titles map to clinics (`dicom.callers`); an
unknown caller's association is rejected before any data flows.

Logs carry AE titles, clinic codes, counts and refusal codes; never UIDs, patient data or
dataset contents.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from diagnostics.serve.api.admission import disk_reserve_bytes, max_upload_bytes
from diagnostics.serve.api.errors import Problem
from diagnostics.serve.config import ServeConfig
from diagnostics.serve.intake import ingest
from diagnostics.serve.store import Store, StoreBusy, StoreFull
from diagnostics.serve.upload import ReceivedFile

log = logging.getLogger("diagnostics.serve.dicom")

VERIFICATION = "1.2.840.10008.1.1"
# The radiograph storage classes accepted; any other SOP class is refused at association time.
STORAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

_CHUNK = 1 << 20
_COMMENT = re.compile(r"[^A-Za-z0-9_.:-]")


def accepted_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes `imaging` can decode here (its own check, over pydicom's list)."""
    from pydicom.uid import AllTransferSyntaxes

    from diagnostics.imaging import ImageError, _check_decoder, quiet_pydicom

    out = []
    for uid in AllTransferSyntaxes:
        try:
            with quiet_pydicom():
                _check_decoder(uid)
        except ImageError:
            continue
        out.append(str(uid))
    return out


def store_status(exc: Problem) -> int:
    """The C-STORE failure status for an intake refusal."""
    if exc.status in (413, 429, 503, 507):  # resources: the sender may retry later
        return OUT_OF_RESOURCES
    if 400 <= exc.status < 500:  # format, QC, a full study (409): resending will not help
        return CANNOT_UNDERSTAND
    return PROCESSING_FAILURE


def error_comment(text: str) -> str:
    """An ErrorComment (LO: at most 64 characters) of plain ASCII."""
    return _COMMENT.sub("_", text)[:64]


@dataclass
class _Association:
    calling_ae: str
    clinic: str
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    end: str = "aborted"  # A-ABORT, a timeout or a dropped connection: anything but a release


class DicomReceiver:
    """C-ECHO and C-STORE SCP on `cfg.dicom.host:port`, feeding `ingest`.

    `on_stored` is called (from an association thread) after each newly stored instance."""

    def __init__(
        self,
        cfg: ServeConfig,
        store: Store,
        *,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.on_stored = on_stored
        self._callers = {aet.strip(): c.clinic for aet, c in cfg.dicom.callers.items()}
        self._ae: Any = None
        self._server: Any = None
        self._lock = threading.Lock()
        self._assocs: dict[int, _Association] = {}

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Bind and serve in background threads. Raises OSError when the address is taken,
        ValueError for an unusable config (no callers, an invalid AE title)."""
        from pynetdicom import AE, evt

        if self._server is not None:
            return
        d = self.cfg.dicom
        if not self._callers:
            raise ValueError("dicom.callers is empty: no calling AE title could send anything")
        pynetdicom_log = logging.getLogger("pynetdicom")
        if pynetdicom_log.level == logging.NOTSET:
            # Its INFO lines add nothing ours lack, and at DEBUG it dumps datasets.
            pynetdicom_log.setLevel(logging.WARNING)

        ae = AE(ae_title=d.ae_title)
        ae.require_calling_aet = sorted(self._callers)
        ae.require_called_aet = True
        ae.maximum_associations = d.max_associations
        ae.maximum_pdu_size = d.max_pdu_bytes
        ae.network_timeout = d.network_timeout_s
        ae.acse_timeout = d.network_timeout_s
        ae.dimse_timeout = d.network_timeout_s
        syntaxes = accepted_transfer_syntaxes()
        ae.add_supported_context(VERIFICATION)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        self._server = ae.start_server((d.host, d.port), block=False, evt_handlers=handlers)
        self._ae = ae
        log.info(
            "dicom receiver %s listening on %s:%d (%d callers, %d transfer syntaxes)",
            d.ae_title,
            d.host,
            self.port,
            len(self._callers),
            len(syntaxes),
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let open associations finish for up to `grace_s`, abort the rest.
        An instance cut off before its answer was not acknowledged: its sender sends it again.
        Idempotent."""
        with self._lock:
            ae, server = self._ae, self._server
            self._ae = self._server = None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace_s
        while ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        ae.shutdown()
        log.info("dicom receiver stopped")

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the receiver is not started")
        return int(self._server.server_address[1])

    # ---------------------------------------------------------------- association events

    def _on_established(self, event: Any) -> None:
        calling = event.assoc.requestor.ae_title.strip()
        with self._lock:
            self._assocs[id(event.assoc)] = _Association(calling, self._callers.get(calling, ""))

    def _on_rejected(self, event: Any) -> None:
        calling = event.assoc.requestor.ae_title.strip()
        called = (event.assoc.requestor.primitive.called_ae_title or "").strip()
        if calling not in self._callers:
            reason = "calling AE title not recognised"
        elif called != self.cfg.dicom.ae_title.strip():
            reason = "called AE title not recognised"
        else:
            reason = "too many associations"
        log.warning(
            "dicom association calling_ae=%s rejected: %s", error_comment(calling) or "-", reason
        )

    def _on_released(self, event: Any) -> None:
        # Fires before the connection closes; an abort may be seen only after it closed.
        with self._lock:
            state = self._assocs.get(id(event.assoc))
            if state is not None:
                state.end = "released"

    def _on_close(self, event: Any) -> None:
        """One line per accepted association, when its connection closes."""
        with self._lock:
            state = self._assocs.pop(id(event.assoc), None)
        if state is None:  # rejected (logged then) or never negotiated
            return
        log.info(
            "dicom association calling_ae=%s clinic=%s accepted: %d stored, %d duplicates, "
            "%d refused, %s",
            state.calling_ae,
            state.clinic,
            state.stored,
            state.duplicates,
            state.refused,
            state.end,
        )

    def _count(self, event: Any, field: str) -> None:
        with self._lock:
            state = self._assocs.get(id(event.assoc))
            if state is not None:
                setattr(state, field, getattr(state, field) + 1)

    # ---------------------------------------------------------------- DIMSE services

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _on_store(self, event: Any) -> Dataset:
        calling = event.assoc.requestor.ae_title.strip()
        clinic = self._callers.get(calling)
        if clinic is None:  # negotiation admits only known callers; kept as a guard
            return self._refuse(event, calling, CANNOT_UNDERSTAND, "calling_ae_not_recognised")
        temp: Path | None = None
        try:
            with event.request.DataSet.getbuffer() as view:
                size = view.nbytes
            if size > max_upload_bytes(self.cfg):  # the HTTP cap holds here too
                return self._refuse(event, calling, OUT_OF_RESOURCES, "instance_too_large")
            free = shutil.disk_usage(self.store.blobs.root).free
            if free - size < disk_reserve_bytes(self.cfg):
                return self._refuse(event, calling, OUT_OF_RESOURCES, "insufficient_storage")
            temp = self.store.blobs.temp_file()
            got = _write_part10(event, temp)
            result = ingest(
                self.cfg,
                self.store,
                got,
                clinic=clinic,
                actor=f"dicom:{calling}",
                source="dicom",
                calling_ae=calling,
            )
        except Problem as exc:
            return self._refuse(event, calling, store_status(exc), exc.code)
        except StoreFull:
            return self._refuse(event, calling, OUT_OF_RESOURCES, "insufficient_storage")
        except StoreBusy:  # the database stayed locked through the store's retries
            return self._refuse(event, calling, OUT_OF_RESOURCES, "database_busy")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return self._refuse(event, calling, OUT_OF_RESOURCES, "insufficient_storage")
            log.error("dicom c-store calling_ae=%s: storage error %s", calling, exc.errno)
            return self._refuse(event, calling, PROCESSING_FAILURE, "processing_failure")
        except Exception as exc:  # never a traceback: it may quote tag values
            log.error("dicom c-store calling_ae=%s failed: %s", calling, type(exc).__name__)
            return self._refuse(event, calling, PROCESSING_FAILURE, "processing_failure")
        finally:
            if temp is not None:  # ingest renamed it into the blob store, or it goes now
                temp.unlink(missing_ok=True)
        if not result.created:
            self._count(event, "duplicates")
        else:
            self._count(event, "stored")
            if self.on_stored is not None:
                try:
                    self.on_stored()
                except Exception as exc:  # the instance is stored: still a success
                    log.error("dicom on_stored callback failed: %s", type(exc).__name__)
        return _status(SUCCESS)

    def _refuse(self, event: Any, calling: str, status: int, code: str) -> Dataset:
        self._count(event, "refused")
        log.warning(
            "dicom c-store calling_ae=%s refused: status=0x%04X code=%s", calling, status, code
        )
        return _status(status, error_comment(code))


def _status(status: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment
    return ds


def _write_part10(event: Any, path: Path) -> ReceivedFile:
    """The received data set as a DICOM Part 10 file at `path` (preamble, file meta as
    negotiated, then the data set bytes exactly as sent), hashed as it is written."""
    from pynetdicom.dsutils import encode_file_meta

    from diagnostics.imaging import quiet_pydicom

    head = b"\x00" * 128 + b"DICM"
    sha = hashlib.sha256()
    size = 0
    with quiet_pydicom():  # its warnings quote UIDs (leading zeros): never to the logs
        meta = head + encode_file_meta(event.file_meta)
    with open(path, "wb") as fh:
        fh.write(meta)
        sha.update(meta)
        size += len(meta)
        with event.request.DataSet.getbuffer() as view:
            for i in range(0, len(view), _CHUNK):
                chunk = view[i : i + _CHUNK]
                fh.write(chunk)
                sha.update(chunk)
                size += len(chunk)
    return ReceivedFile(path=path, size=size, sha256=sha.hexdigest(), head=head, filename="")
