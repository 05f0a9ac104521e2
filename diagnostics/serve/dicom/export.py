"""Results back to each clinic's PACS, through the outbox (`store.outbox`).

`plan_once` makes the DICOM objects studies need, writes each as a Part 10 file under
`<data>/outbox/` (temp file, fsync, rename) and only then enqueues it, one row per route:

- a scored study with a scored DICOM image, of a clinic with a destination: a TID 1500
  Comprehensive SR of its findings (`results.ai_report`), and a heatmap Secondary Capture per
  positive finding (`results.heatmap_capture`, when `dicom.export.heatmaps`);
- once every finding of the study has a review: a review SR (`results.review_report`) that
  refers to the AI SR and to earlier review SRs, never replacing them. Each later review
  makes another.

`send_once` sends what is due, by C-STORE (pynetdicom SCU) and/or STOW-RS (httpx), and
records each outcome: sent, a retry after backoff, or failed (a refusal no retry can fix, or
attempts spent). Nothing is retried forever.

Only patient data that came in the source images goes out (highdicom copies it from them).
Logs carry study IDs (generated here), kinds, routes and status codes: never UIDs, patient
data, or the STOW-RS credentials.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread

from diagnostics.serve import i18n
from diagnostics.serve.config import DicomDestination, ServeConfig
from diagnostics.serve.dicom import results
from diagnostics.serve.qc import OUTSIDE_POPULATION
from diagnostics.serve.store import Store, StoreBusy, _fsync_dir
from diagnostics.serve.store.tables import Instance, OutboxItem
from diagnostics.serve.store.views import FindingView, ReviewView, StudyView

log = logging.getLogger("diagnostics.serve.dicom.export")

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
# C-STORE statuses (PS3.4 B.2.3, PS3.7 C) that mean the PACS holds the object
STORED = {
    0x0000: "success",
    0xB000: "coercion",
    0xB006: "elements discarded",
    0xB007: "does not match SOP class",
}
PROCESSING_FAILURE = 0x0110
MIN_HEATMAP_PX = 512  # the overlay (model resolution) is upscaled to at least this
PLAN_BATCH = 4  # studies per planning pass: their objects are sent before the next pass
SEND_BATCH = 20  # outbox rows claimed per send
ACTOR = "exporter"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class BuildError(Exception):
    """An object could not be made for a study (the message holds no UID or patient data)."""


@dataclass(frozen=True)
class Outcome:
    """One send's result: sent, or an error (permanent: no retry can fix it)."""

    sent: bool
    error: str = ""
    permanent: bool = False


SENT = Outcome(True)


def routes(dest: DicomDestination | None) -> list[str]:
    """The routes a destination has: C-STORE needs AE title, host and port; STOW-RS a URL."""
    if dest is None:
        return []
    out = []
    if dest.ae_title.strip() and dest.host.strip() and dest.port:
        out.append("cstore")
    if dest.stow_url.strip():
        out.append("stow")
    return out


def population_text(result: dict[str, Any]) -> str:
    """How the study was judged against the model's intended population, in English."""
    pop = result.get("population") or {}
    flags = result.get("flags") or []
    age = pop.get("age_years")
    where = "from DICOM" if pop.get("age_source") else "given"
    age_words = f"age {i18n.age_text('en', float(age))} {where}" if age is not None else None
    if pop.get("inside") is False or OUTSIDE_POPULATION in flags:
        return f"outside the intended population: no call ({i18n.outside_reason('en', pop)})"
    if pop.get("inside") is True:
        if pop.get("evidence") == "age" and age_words:
            return f"inside the intended population ({age_words})"
        return "inside the intended population (by the model's population check; no age known)"
    if not pop:
        return "not checked (not recorded)"
    if pop.get("ages"):
        return "not checked (no age known and the model has no population check)"
    return "not checked (the model states no intended population)"


def verdict(review: ReviewView, label: str) -> str:
    """A stored review as a `results.ReviewDecision` verdict: a changed label is a
    correction. Raises BuildError for a verdict the SR cannot state."""
    corrected = review.get("corrected_label")
    value = str(review["verdict"])
    if corrected and corrected != label and value != "uncertain":
        value = "corrected"
    if value not in results.VERDICTS:
        raise BuildError(f"review verdict {value!r} has no coded value in the review SR")
    return value


def read_overlay(path: Path, min_px: int = MIN_HEATMAP_PX) -> np.ndarray:
    """A heatmap overlay PNG as (H, W, 3) uint8, upscaled (bilinear) so its shorter side is
    at least `min_px`."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    if min(w, h) < min_px:
        k = min_px / min(w, h)
        rgb = rgb.resize((math.ceil(w * k), math.ceil(h * k)), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).copy()


class Exporter:
    """Plans and sends the DICOM results of `cfg.dicom.destinations`' clinics."""

    def __init__(self, cfg: ServeConfig, store: Store, data_dir: Path) -> None:
        self.cfg = cfg
        self.export = cfg.dicom.export
        self.store = store
        self.data_dir = Path(data_dir)
        self.outbox_dir = self.data_dir / "outbox"
        self.wake = threading.Event()  # set to plan and send at once (e.g. after a review)
        # (study, kind) whose object could not be made: not tried again by this process
        self._unbuildable: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ planning

    def _clinics(self) -> list[str]:
        return [c for c, d in self.cfg.dicom.destinations.items() if routes(d)]

    def plan_once(self) -> int:
        """Make and enqueue what studies need now. Returns the outbox rows added."""
        clinics = self._clinics()
        if not clinics:
            return 0
        _quiet_libraries()
        added = 0
        skip = [sid for sid, what in self._unbuildable if what == "ai_sr"]
        for sid in self.store.studies_needing_ai_sr(clinics, PLAN_BATCH, skip):
            added += self._guarded(sid, "ai_sr", lambda sid=sid: self._plan_ai(sid))
        # keyed by review: a later review of the same study is tried afresh
        stuck = {(sid, what) for sid, what in self._unbuildable if what != "ai_sr"}
        due = self.store.studies_needing_review_sr(clinics, PLAN_BATCH + len(stuck))
        for sid, rid in [d for d in due if (d[0], f"review_sr:{d[1]}") not in stuck][:PLAN_BATCH]:
            added += self._guarded(
                sid, f"review_sr:{rid}", lambda sid=sid, rid=rid: self._plan_review(sid, rid)
            )
        return added

    def _guarded(self, study_id: str, what: str, plan: Any) -> int:
        """Run one plan; a failure is logged once (no values: exception texts may quote
        them) and not tried again by this process."""
        from diagnostics.imaging import quiet_pydicom

        try:
            with quiet_pydicom():  # pydicom's and highdicom's warnings quote UIDs
                return int(plan())
        except StoreBusy:
            raise
        except BuildError as exc:
            why = str(exc)
        except Exception as exc:
            why = f"{type(exc).__name__} in {_origin(exc)}"
        self._unbuildable.add((study_id, what))
        kind = what.split(":")[0]
        log.warning(
            "study %s: %s not made (%s); not tried again until restart", study_id, kind, why
        )
        return 0

    def _sources(self, study: Any, instances: list[Instance]) -> dict[str, tuple[str, Dataset]]:
        """instance ID -> (SOP Instance UID, header) of the study's scored DICOM images (of
        one Study Instance UID: the study's, else its first image's)."""
        out: dict[str, tuple[str, Dataset]] = {}
        want = study.study_instance_uid
        for inst in instances:
            if inst.format != "dicom" or inst.status != "scored":
                continue
            try:
                ds = dcmread(self.store.blobs.path(inst.content_sha256), stop_before_pixels=True)
            except (OSError, ValueError) as exc:
                raise BuildError(
                    f"image {inst.position} unreadable ({type(exc).__name__})"
                ) from None
            uid = str(ds.get("StudyInstanceUID") or "")
            want = want or uid
            if uid and uid == want and ds.get("SOPInstanceUID"):
                out[inst.id] = (str(ds.SOPInstanceUID), ds)
        if not out:
            raise BuildError("no readable scored DICOM image")
        return out

    def _algorithm(self, view: StudyView) -> results.AlgorithmInfo:
        res = view.get("result") or {}
        first = view["findings"][0]
        return results.AlgorithmInfo(
            name=str(res.get("model_name") or "unknown model"),
            version=str(res.get("model_version") or first.get("model_version") or "unversioned"),
            model_sha256=str(res.get("model_sha256") or first.get("model_sha256") or ""),
        )

    def _plan_ai(self, study_id: str) -> int:
        study = self.store.get_study(study_id)
        view = self.store.study_view(study_id)
        if study is None or view is None or not view["findings"]:
            raise BuildError("study or findings gone")
        dest_routes = routes(self.cfg.dicom.destinations.get(study.clinic_id))
        sources = self._sources(study, self.store.study_instances(study_id))
        headers = [ds for _, ds in sources.values()]
        algorithm = self._algorithm(view)
        findings = [
            results.ReportFinding(
                label=f["label"],
                display=i18n.finding("en", f["label"]),
                probability=float(f["probability"]),
                threshold=float(f["threshold"]),
                positive=f["positive"],
                image_uids=tuple(
                    sources[p["instance_id"]][0]
                    for p in f.get("images") or []
                    if p.get("instance_id") in sources
                ),
            )
            for f in view["findings"]
        ]
        sr = results.ai_report(
            headers,
            findings,
            algorithm,
            population=population_text(view.get("result") or {}),
            study_ref=study_id,
        )
        added = 0
        if self.export.heatmaps:  # before the SR: its row marks the study planned
            number = 0
            for f, rf in zip(view["findings"], findings, strict=True):
                if f["positive"] is not True or not f.get("heatmap"):
                    continue
                sc = self._heatmap(f, rf, sources, algorithm, number + 1)
                if sc is None:
                    continue
                number += 1
                added += self._enqueue(study, "heatmap_sc", _key(f["label"]), sc, dest_routes)
        added += self._enqueue(study, "ai_sr", "", sr, dest_routes)
        log.info("study %s: AI SR planned (%d outbox rows)", study_id, added)
        return added

    def _heatmap(
        self,
        f: FindingView,
        finding: results.ReportFinding,
        sources: dict[str, tuple[str, Dataset]],
        algorithm: results.AlgorithmInfo,
        number: int,
    ) -> Dataset | None:
        """The SC of a positive finding, on its image with the highest probability."""
        name = str(f["heatmap"])
        path = self.data_dir / "heatmaps" / name
        if Path(name).name != name or not path.is_file():
            log.warning("heatmap of a finding is missing: no secondary capture for it")
            return None
        parts = [p for p in f.get("images") or [] if p.get("instance_id") in sources]
        if parts:
            top = max(parts, key=lambda p: float(p.get("probability") or 0.0))
            source = sources[top["instance_id"]][1]
        else:
            source = next(iter(sources.values()))[1]
        return results.heatmap_capture(
            source, read_overlay(path), finding, algorithm, instance_number=number
        )

    def _plan_review(self, study_id: str, review_id: int) -> int:
        study = self.store.get_study(study_id)
        view = self.store.study_view(study_id)
        if study is None or view is None:
            raise BuildError("study gone")
        ai = self.store.outbox_items(study_id, kind="ai_sr", limit=1)
        if not ai:
            raise BuildError("no AI SR to refer to")
        ai_sr = self._read(ai[0].file)
        earlier: dict[str, str] = {}  # key -> file, oldest first (both routes share a file)
        for item in self.store.outbox_items(study_id, kind="review_sr", limit=10_000):
            earlier.setdefault(item.key, item.file)
        previous = [self._read(name) for name in earlier.values()]
        decisions: list[results.ReviewDecision] = []
        signer: ReviewView | None = None
        for f in view["findings"]:
            review = f["review"]
            if review is None:
                raise BuildError("a finding has no review")
            decisions.append(
                results.ReviewDecision(
                    label=f["label"],
                    display=i18n.finding("en", f["label"]),
                    verdict=verdict(review, f["label"]),
                    corrected_label=review.get("corrected_label"),
                    note=review.get("note") or "",
                )
            )
            signer = review if review["id"] == review_id else signer
        added_labels: set[str] = set()
        for review in view["unlisted"]:  # latest first: the latest per label stands
            signer = review if review["id"] == review_id else signer
            label = review.get("corrected_label") or ""
            if not label or label in added_labels:
                continue
            added_labels.add(label)
            decisions.append(
                results.ReviewDecision(
                    label=label,
                    display=i18n.finding("en", label),
                    verdict="unlisted",
                    corrected_label=label,
                    note=review.get("note") or "",
                )
            )
        if signer is None:
            raise BuildError("the latest review is not a current one")
        sources = self._sources(study, self.store.study_instances(study_id))
        sr = results.review_report(
            ai_sr,
            [ds for _, ds in sources.values()],
            decisions,
            reviewer=str(signer["reviewer"]),
            signed_at=datetime.fromisoformat(signer["created_at"]),
            instance_number=len(previous) + 1,
            previous=previous,
        )
        dest_routes = routes(self.cfg.dicom.destinations.get(study.clinic_id))
        added = self._enqueue(study, "review_sr", str(review_id), sr, dest_routes)
        log.info("study %s: review SR planned (%d earlier)", study_id, len(previous))
        return added

    def _read(self, name: str) -> Dataset:
        try:
            return dcmread(self.outbox_dir / name)
        except (OSError, ValueError) as exc:
            raise BuildError(f"outbox file unreadable ({type(exc).__name__})") from None

    def _enqueue(self, study: Any, kind: str, key: str, ds: Dataset, dest_routes: list[str]) -> int:
        """Write `ds` durably, then its rows. A row that was there already keeps its own
        file: the one written here goes."""
        name = f"{study.id}.{kind}.{uuid.uuid4().hex[:12]}.dcm"
        write_part10(ds, self.outbox_dir / name)
        added = self.store.enqueue(
            study_id=study.id,
            clinic_id=study.clinic_id,
            kind=kind,
            key=key,
            routes=dest_routes,
            sop_instance_uid=str(ds.SOPInstanceUID),
            file=name,
            max_attempts=self.export.max_attempts,
            actor=ACTOR,
        )
        if not added:
            (self.outbox_dir / name).unlink(missing_ok=True)
        return added

    # ------------------------------------------------------------------ sending

    def send_once(self) -> int:
        """Send what is due. Returns how many rows were tried."""
        claim = self.export.timeout_s * (SEND_BATCH + 2)  # one association, sends in a row
        items = self.store.due_outbox(SEND_BATCH, claim_s=claim)
        if not items:
            return 0
        by_clinic: dict[str, list[OutboxItem]] = {}
        for item in items:
            if item.route == "cstore":
                by_clinic.setdefault(item.clinic_id, []).append(item)
            else:
                self._record(item, self._stow(item))
        for clinic, batch in by_clinic.items():
            for item, outcome in zip(batch, self._cstore(clinic, batch), strict=True):
                self._record(item, outcome)
        return len(items)

    def _record(self, item: OutboxItem, outcome: Outcome) -> None:
        if outcome.sent:
            self.store.mark_sent(item.id, actor=ACTOR)
            log.info("study %s: %s sent by %s", item.study_id, item.kind, item.route)
            return
        state = self.store.mark_failed_attempt(
            item.id,
            outcome.error,
            permanent=outcome.permanent,
            backoff_s=self.export.backoff_s,
            max_backoff_s=self.export.max_backoff_s,
            actor=ACTOR,
        )
        log.warning(
            "study %s: %s by %s not sent (%s), attempt %d: %s",
            item.study_id,
            item.kind,
            item.route,
            outcome.error,
            item.attempts + 1,
            state,
        )

    def _load(self, item: OutboxItem) -> Dataset | Outcome:
        try:
            return dcmread(self.outbox_dir / item.file)
        except (OSError, ValueError) as exc:
            return Outcome(False, f"outbox file unreadable ({type(exc).__name__})", True)

    def _cstore(self, clinic: str, items: list[OutboxItem]) -> list[Outcome]:
        """C-STORE each item over one association with the clinic's PACS."""
        from pynetdicom import AE

        dest = self.cfg.dicom.destinations.get(clinic)
        if "cstore" not in routes(dest):
            return [Outcome(False, "no C-STORE destination configured for the clinic")] * len(items)
        assert dest is not None
        _quiet_libraries()
        t = self.export.timeout_s
        ae = AE(ae_title=self.cfg.dicom.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = t
        for sop_class in (COMPREHENSIVE_SR, SECONDARY_CAPTURE):
            ae.add_requested_context(sop_class, [EXPLICIT_LE, IMPLICIT_LE])
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title.strip())
        except Exception as exc:  # a bad host name, say
            return [Outcome(False, f"cannot connect ({type(exc).__name__})")] * len(items)
        if not assoc.is_established:
            where = f"{dest.ae_title.strip()}@{dest.host}:{dest.port}"
            if assoc.is_rejected:
                why = f"association rejected by the PACS {where}"
            else:  # pynetdicom reports a refused connection as an abort
                why = f"no association with {where}: refused, aborted or timed out"
            return [Outcome(False, why)] * len(items)
        out: list[Outcome] = []
        try:
            for item in items:
                if not assoc.is_established:
                    out.append(Outcome(False, "association ended before this object was sent"))
                    continue
                ds = self._load(item)
                if isinstance(ds, Outcome):
                    out.append(ds)
                    continue
                try:
                    status = assoc.send_c_store(ds)
                except ValueError:  # no accepted presentation context (or not encodable)
                    out.append(
                        Outcome(False, "the PACS accepts no presentation context for it", True)
                    )
                    continue
                out.append(cstore_outcome(status.get("Status") if status else None))
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
        return out

    def _stow(self, item: OutboxItem) -> Outcome:
        """STOW-RS: POST {stow_url}/studies, multipart/related; type="application/dicom"."""
        import httpx

        dest = self.cfg.dicom.destinations.get(item.clinic_id)
        if dest is None or "stow" not in routes(dest):
            return Outcome(False, "no STOW-RS destination configured for the clinic")
        try:
            data = (self.outbox_dir / item.file).read_bytes()
        except OSError as exc:
            return Outcome(False, f"outbox file unreadable ({type(exc).__name__})", True)
        auth = None
        if dest.stow_user_env or dest.stow_password_env:
            user = os.environ.get(dest.stow_user_env, "") if dest.stow_user_env else ""
            password = os.environ.get(dest.stow_password_env) if dest.stow_password_env else ""
            if password is None:
                return Outcome(False, f"STOW-RS password: {dest.stow_password_env} is not set")
            auth = httpx.BasicAuth(user, password)
        boundary = uuid.uuid4().hex
        body = b"".join(
            (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            )
        )
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        url = dest.stow_url.rstrip("/") + "/studies"
        try:
            r = httpx.post(
                url, content=body, headers=headers, auth=auth, timeout=self.export.timeout_s
            )
        except httpx.HTTPError as exc:  # timeout, connection refused, ...: no answer
            return Outcome(False, f"STOW-RS: no answer ({type(exc).__name__})")
        return stow_outcome(r.status_code, _failed_sops(r))

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event) -> None:
        """Plan, send, wait `poll_s` (or a wake-up); until `stop`. Never dies of one error."""
        if not self.export.enabled:
            log.info("DICOM export is off (dicom.export.enabled)")
            return
        log.info("DICOM exporter started (%d destinations)", len(self._clinics()))
        while not stop.is_set():
            busy = False
            try:
                busy = self.plan_once() > 0
                while self.send_once() >= SEND_BATCH and not stop.is_set():
                    pass  # drain what is due first: a study's results go out soon after it
                    # is scored, rather than after every other study has been planned
            except StoreBusy:
                pass
            except Exception:
                log.exception("DICOM export loop error")
            if not busy:
                self.wake.wait(self.export.poll_s)
                self.wake.clear()
        log.info("DICOM exporter stopped")


def cstore_outcome(status: int | None) -> Outcome:
    """A C-STORE answer: stored (success or a warning), a retry, or a permanent refusal."""
    if status is None:
        return Outcome(False, "no C-STORE answer (timed out or aborted)")
    code = int(status)
    if code in STORED:
        return SENT
    if 0xA700 <= code <= 0xA7FF:
        return Outcome(False, f"C-STORE status 0x{code:04X} (out of resources)")
    if code == PROCESSING_FAILURE:
        return Outcome(False, f"C-STORE status 0x{code:04X} (processing failure)")
    if 0xA900 <= code <= 0xA9FF:
        return Outcome(
            False, f"C-STORE status 0x{code:04X} (data set does not match SOP class)", True
        )
    if 0xC000 <= code <= 0xCFFF:
        return Outcome(False, f"C-STORE status 0x{code:04X} (cannot understand)", True)
    return Outcome(False, f"C-STORE status 0x{code:04X} (refused)", True)


def stow_outcome(http_status: int, failed: bool = False) -> Outcome:
    """A STOW-RS answer: 200 (and 202 without a failed instance) stored; 400, 409 and 415
    refused for good; anything else (401/403/404, 5xx) retried, within max_attempts."""
    if http_status == 200 or (http_status == 202 and not failed):
        return SENT
    if http_status in (400, 409, 415) or http_status == 202:
        return Outcome(False, f"STOW-RS HTTP {http_status} (refused)", True)
    return Outcome(False, f"STOW-RS HTTP {http_status}")


def _failed_sops(r: Any) -> bool:
    """Whether a STOW-RS response lists a failed instance (FailedSOPSequence, 0008,1198)."""
    if r.status_code != 202:
        return False
    try:
        doc = r.json()
    except ValueError:
        return False
    return bool(isinstance(doc, dict) and (doc.get("00081198") or {}).get("Value"))


def write_part10(ds: Dataset, path: Path) -> None:
    """`ds` as a Part 10 file at `path`: temp file, fsync, rename, directory fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _origin(exc: BaseException) -> str:
    """The module the exception was raised in (its message is not logged)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "?")) if tb is not None else "?"


def _key(label: str) -> str:
    return _SAFE.sub("_", label)[:64]


def _quiet_libraries() -> None:
    """pynetdicom's INFO lines add nothing ours lack (at DEBUG it dumps datasets), and
    highdicom's INFO lines quote the source's SOP Instance UID: WARNING and up only, unless
    the site set their levels itself."""
    for name in ("pynetdicom", "highdicom"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def start_thread(exporter: Exporter) -> tuple[threading.Thread, threading.Event]:
    """Run `exporter` in a daemon thread; set the event (and `exporter.wake`) to stop it."""
    stop = threading.Event()
    thread = threading.Thread(target=exporter.run, args=(stop,), name="dicom-export", daemon=True)
    thread.start()
    return thread, stop


__all__ = [
    "BuildError",
    "Exporter",
    "Outcome",
    "cstore_outcome",
    "population_text",
    "read_overlay",
    "routes",
    "start_thread",
    "stow_outcome",
    "write_part10",
]
