"""DICOM load on the clinic service's receiver: concurrent C-STORE associations in, TID 1500 SRs
back out to a PACS, against the runner's raw throughput on the same inputs measured in the
same run.

    .venv/bin/python benchmarks/dicom_load.py [--model M.onnx] [--studies 100]
        [--associations 10] [--images-per-study 1] [--quiet-s 1.0]

In a temp folder: a pynetdicom storage SCP plays the clinic's PACS (it accepts Comprehensive
SR and Secondary Capture and records when each SR arrives, by its Study Instance UID), and
`diagnostics serve` runs as a real process with `dicom.enabled`, caller BENCH -> clinic bench,
whose results go back to that SCP. `--studies` distinct studies (noise variants of the real
chest ../shared/data/dicom/pydicom-data_RG1_UNCR.dcm with new UIDs, or synthetic chests
without ../shared) are sent over `--associations` concurrent associations. Reported: C-STORE
acknowledgement latency per image, last-image acknowledgement -> SR arrival per study (and
that minus the quiet period: the service's own part), studies/s from the first send to the
last SR, and that over the runner alone (`Scorer.score_many`, the config's batch size).

Without --model, the tests' tiny fixture model (a CNN trained on synthetic 64 px chests) is
trained into the temp folder first (10-20 s here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

SHARED_DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
REAL_CHEST = SHARED_DICOM / "pydicom-data_RG1_UNCR.dcm"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CALLING_AE, CLINIC, SERVICE_AE, PACS_AE = "BENCH", "bench", "DIAGNOSTICS", "PACS"
BATCH = 8  # model.batch_size, for the service and the runner alike


@dataclass
class StudyInput:
    uid: str
    files: list[Path]
    acked: int = 0  # images answered 0x0000
    refusals: list[str] = field(default_factory=list)
    sent_at: float | None = None  # perf_counter when its last image was acknowledged


# --------------------------------------------------------------------------- model and inputs


def _fixture_model(root: Path) -> Path:
    """The tests' `cxr_model`: a tiny CNN on 160 synthetic 64 px chests, 3 epochs, CPU."""
    from diagnostics.data.synthetic import write_dataset
    from diagnostics.settings import get_settings
    from diagnostics.train.config import CXRTrainConfig
    from diagnostics.train.cxr import train_cxr

    os.environ["DIAGNOSTICS_HOME"] = str(root / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    get_settings.cache_clear()
    manifest = write_dataset(root / "data", 160, size=64, seed=11)
    cfg = CXRTrainConfig.model_validate(
        {
            "name": "fixture",
            "data": {
                "source": "manifest",
                "labels_file": str(manifest),
                "split": {"fractions": {"train": 0.7, "val": 0.3}},
            },
            "model": {"name": "tiny_cnn", "options": {"width": 8, "blocks": 3}},
            "preprocess": {"size": 64},
            "train": {"threads": 2, "epochs": 3, "batch_size": 16, "lr": 0.003},
            "eval": {"bootstrap": 0, "parity_images": 2},
            "tracking": {"experiment": "fixture", "registered_model": None},
        }
    )
    return train_cxr(cfg, progress=False).onnx_path


def _write_inputs(out: Path, studies: int, per_study: int, seed: int = 0) -> tuple[str, str, str]:
    """`studies` x `per_study` Part 10 files under `out/<study>/`, each with its own pixels.
    Returns (what they are, SOP class, transfer syntax)."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    if REAL_CHEST.is_file():
        ds = dcmread(REAL_CHEST)
        base = ds.pixel_array.astype(np.uint16)
        top = np.uint16(2 ** int(ds.BitsStored) - 1)
        kind = f"real chest {REAL_CHEST.name} ({ds.Rows}x{ds.Columns}, {ds.BitsStored} bit)"

        def image(_: int) -> bytes:
            noise = rng.integers(0, 2, base.shape, dtype=np.uint16)  # +0/+1 LSB per pixel
            return np.minimum(base + noise, top).tobytes()
    else:
        from diagnostics.data.synthetic import SynthSpec, dicom_dataset, generate, to_stored

        made = generate(studies * per_study, SynthSpec(size=512), seed)
        ds = dicom_dataset(
            to_stored(made[0][1].pixels, 12, "MONOCHROME2"),
            bits=12,
            photometric="MONOCHROME2",
            uid_seed="dicom_load",
        )
        kind = "synthetic chests (512x512, 12 bit; ../shared absent)"

        def image(i: int) -> bytes:
            return to_stored(made[i][1].pixels, 12, "MONOCHROME2").tobytes()

    n = 0
    for s in range(studies):
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        folder = out / f"{s:05d}"
        folder.mkdir()
        for k in range(per_study):
            ds.PixelData = image(n)
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = k + 1
            ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
            n += 1
    return kind, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def _studies(folder: Path) -> list[StudyInput]:
    from pydicom import dcmread

    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(sub.glob("*.dcm"), key=lambda p: int(p.stem))
        uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        out.append(StudyInput(uid, files))
    return out


def _runner_rate(
    model_path: Path, studies: list[StudyInput], ood: bool, tmp: Path
) -> tuple[float, float, dict[str, int]]:
    """Studies/s of `Scorer.score_many` alone, in this process, on the same files, a batch of
    studies per call as the worker claims them (files read inside the clock)."""
    from diagnostics.serve.qc import QCConfig
    from diagnostics.serve.runner import OnnxModel, Scorer

    scorer = Scorer(
        OnnxModel(model_path, device="cpu"),
        QCConfig(ood=ood),
        heatmap_dir=tmp / "runner-heatmaps",
        batch_size=BATCH,
        parallel_decode=False,  # one image at a time, as the service's worker decodes
    )
    scorer.score_many([f.read_bytes() for s in studies[:BATCH] for f in s.files])  # warm-up
    outcomes: Counter[str] = Counter()
    t0 = time.perf_counter()
    for i in range(0, len(studies), BATCH):
        data = [f.read_bytes() for s in studies[i : i + BATCH] for f in s.files]
        for r in scorer.score_many(data):
            outcomes[r.status if r.status == "scored" else f"{r.status}:{r.code}"] += 1
    wall = time.perf_counter() - t0
    return len(studies) / wall, wall, dict(outcomes)


# --------------------------------------------------------------------------- the PACS


class Pacs:
    """A storage SCP standing in for the clinic's PACS: records each SR's arrival."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sr_at: dict[str, float] = {}  # Study Instance UID -> first SR arrival
        self.counts: Counter[str] = Counter()
        self.server = None

    def start(self) -> int:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE, evt

        ae = AE(ae_title=PACS_AE)
        ae.maximum_associations = 16
        for sop in (COMPREHENSIVE_SR, SECONDARY_CAPTURE):
            ae.add_supported_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return int(self.server.server_address[1])

    def _on_store(self, event) -> int:
        t = time.perf_counter()
        sop = str(event.request.AffectedSOPClassUID)
        study = str(event.dataset.StudyInstanceUID)
        with self.lock:
            if sop == COMPREHENSIVE_SR:
                self.counts["sr"] += 1
                self.sr_at.setdefault(study, t)
            else:
                self.counts["sc" if sop == SECONDARY_CAPTURE else sop] += 1
        return 0x0000

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


# --------------------------------------------------------------------------- sending


def _send(
    port: int,
    share: list[StudyInput],
    context: tuple[str, str],
    acks: list[float],
    lock: threading.Lock,
    first: list[float],
) -> None:
    """One association from BENCH, sending its share of studies image by image."""
    from pynetdicom import AE

    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300
    ae.add_requested_context(*context)
    with lock:
        first.append(time.perf_counter())
    assoc = ae.associate("127.0.0.1", port, ae_title=SERVICE_AE)
    if not assoc.is_established:
        for study in share:
            study.refusals.append("no association")
        return
    try:
        for study in share:
            for path in study.files:
                t0 = time.perf_counter()
                try:
                    status = assoc.send_c_store(path)
                except Exception as exc:
                    study.refusals.append(type(exc).__name__)
                    continue
                t1 = time.perf_counter()
                code = int(status.Status) if status and "Status" in status else None
                if code == 0x0000:
                    study.acked += 1
                    with lock:
                        acks.append((t1 - t0) * 1000)
                else:
                    study.refusals.append("no answer" if code is None else f"0x{code:04X}")
            if study.acked == len(study.files):
                study.sent_at = time.perf_counter()
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _echo(port: int) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context("1.2.840.10008.1.1")
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=SERVICE_AE)
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and status.Status == 0
    finally:
        ae.shutdown()


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.0f}" if values else "n/a"


def _machine() -> str:
    name = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{len(os.sched_getaffinity(0))} cores usable ({os.cpu_count()} online), {name}"


def _timeline(store, offset: float) -> dict[str, dict[str, float]]:
    """Study Instance UID -> perf_counter times of its stages, from the store: `scored` (its
    job finished), `planned` (its AI SR written to the outbox), `sent` (marked sent); and
    `positives` (positive findings: one heatmap capture each)."""
    from sqlalchemy import func, select

    from diagnostics.serve.store.tables import FindingRow, Job, OutboxItem, Study, as_utc

    def t(dt: object) -> float:
        return as_utc(dt).timestamp() - offset  # type: ignore[arg-type]

    out: dict[str, dict[str, float]] = {}
    with store.session() as s:
        for uid, done in s.execute(
            select(Study.study_instance_uid, Job.updated_at)
            .join(Job, Job.study_id == Study.id)
            .where(Job.status.in_(("scored", "failed_qc", "failed")))
        ):
            out.setdefault(uid, {})["scored"] = t(done)
        for uid, made, sent in s.execute(
            select(Study.study_instance_uid, OutboxItem.created_at, OutboxItem.sent_at)
            .join(OutboxItem, OutboxItem.study_id == Study.id)
            .where(OutboxItem.kind == "ai_sr")
        ):
            out.setdefault(uid, {})["planned"] = t(made)
            if sent is not None:
                out[uid]["sent"] = t(sent)
        for uid, n in s.execute(
            select(Study.study_instance_uid, func.count(FindingRow.id))
            .join(FindingRow, FindingRow.study_id == Study.id)
            .where(FindingRow.positive.is_(True))
            .group_by(Study.study_instance_uid)
        ):
            out.setdefault(uid, {})["positives"] = float(n)
    return out


def _log_problems(path: Path) -> list[str]:
    """Warning-and-up lines of the service log (JSON lines; anything else kept as is)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            if line.strip() and ("Error" in line or "Traceback" in line):
                out.append(line)
            continue
        if isinstance(doc, dict) and doc.get("level") in ("warning", "error", "critical"):
            out.append(line)
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an exported .onnx (default: fixture model)")
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--associations", type=int, default=10)
    parser.add_argument("--images-per-study", type=int, default=1)
    parser.add_argument("--quiet-s", type=float, default=1.0, help="studies.quiet_period_s")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for SRs")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    t_start = time.perf_counter()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {_machine()}; python {platform.python_version()}")

    work = Path(tempfile.mkdtemp(prefix="dicom_load_"))
    os.environ["DIAGNOSTICS_HOME"] = str(work / "home")
    fixture = args.model is None
    if fixture:
        t0 = time.perf_counter()
        args.model = _fixture_model(work / "model")
        print(f"model: fixture tiny CNN (64 px), trained here in {time.perf_counter() - t0:.0f} s")
    else:
        print(f"model: {args.model}")
    t0 = time.perf_counter()
    kind, sop_class, syntax = _write_inputs(work / "inputs", args.studies, args.images_per_study)
    studies = _studies(work / "inputs")
    size_mb = sum(f.stat().st_size for s in studies for f in s.files) / 1e6
    print(
        f"inputs: {len(studies)} studies x {args.images_per_study} image(s), {kind}, new UIDs "
        f"and +0/1 LSB noise per image; {size_mb:.0f} MB in all (made in "
        f"{time.perf_counter() - t0:.0f} s)"
    )
    real = REAL_CHEST.is_file()
    # The OOD reference is the training set's: it is on only where the inputs come from it.
    ood = real != fixture
    why = (
        "the fixture model knows only synthetic chests, the inputs are real"
        if fixture and real
        else "a real model, synthetic inputs"
        if not fixture and not real
        else "inputs from the model's own kind"
    )
    print(f"qc.ood: {'on' if ood else 'off'} ({why})")
    print(
        f"quiet period: {args.quiet_s:g} s; batch {BATCH}; {args.associations} associations; "
        "sender, PACS and service share this machine"
    )

    # Baseline: the runner alone, in this process, before the service starts.
    raw, wall, outcomes = _runner_rate(args.model, studies, ood, work)
    print(f"runner alone: {raw:.2f} studies/s ({len(studies)} in {wall:.1f} s; {outcomes})")

    pacs = Pacs()
    pacs_port = pacs.start()
    http_port, dicom_port = _free_port(), _free_port()
    cfg = {
        "host": "127.0.0.1",
        "port": http_port,
        "data_dir": str(work / "serve"),
        "model": {"path": str(args.model), "device": "cpu", "batch_size": BATCH},
        "limits": {"rate_per_minute": 1_000_000, "max_queue": 1_000_000, "disk_reserve_mb": 0},
        "worker": {"poll_s": 0.05},
        "qc": {"ood": ood},
        "studies": {"quiet_period_s": args.quiet_s},
        "dicom": {
            "enabled": True,
            "ae_title": SERVICE_AE,
            "host": "127.0.0.1",
            "port": dicom_port,
            "max_associations": max(10, args.associations + 2),
            "callers": {CALLING_AE: {"clinic": CLINIC}},
            "destinations": {CLINIC: {"ae_title": PACS_AE, "host": "127.0.0.1", "port": pacs_port}},
            "export": {"backoff_s": 0.5, "poll_s": 0.2, "timeout_s": 30},
        },
    }
    (work / "serve.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DIAGNOSTICS_HOME": str(work / "home"), "RUST_BACKTRACE": "0"}
    log_path = work / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed after the server stops)
    server = subprocess.Popen(
        [sys.executable, "-m", "diagnostics", "serve", "--config", str(work / "serve.yaml")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    acks: list[float] = []
    first: list[float] = []
    lock = threading.Lock()
    complete = False
    try:
        deadline = time.monotonic() + 120
        while not _echo(dicom_port):
            if time.monotonic() > deadline or server.poll() is not None:
                print("the service did not start:")
                print(log_path.read_text(errors="replace")[-3000:])
                return 1
            time.sleep(0.3)

        shares = [studies[i :: args.associations] for i in range(args.associations)]
        threads = [
            threading.Thread(
                target=_send, args=(dicom_port, share, (sop_class, syntax), acks, lock, first)
            )
            for share in shares
            if share
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_sent = time.perf_counter()
        sent = [s for s in studies if s.sent_at is not None]

        from diagnostics.serve.config import ServeConfig
        from diagnostics.serve.store import Store

        scfg = ServeConfig.model_validate(cfg)
        store = Store(scfg.resolved_database_url(work / "home"), work / "serve" / "blobs")

        def by_uid() -> dict[str, object]:
            rows = store.list_studies([CLINIC], limit=10 * len(studies) + 10)
            return {r.study_instance_uid: r for r in rows}

        # Wait for every acknowledged study's SR, or its end without one (refused by QC).
        deadline = time.monotonic() + args.timeout
        next_check = 0.0
        no_sr: dict[str, str] = {}
        while True:
            with pacs.lock:
                arrived = set(pacs.sr_at)
            waiting = [s for s in sent if s.uid not in arrived and s.uid not in no_sr]
            if not waiting or server.poll() is not None or time.monotonic() > deadline:
                break
            if time.monotonic() > next_check:
                rows = by_uid()
                for s in waiting:
                    row = rows.get(s.uid)
                    if row is not None and row.status in ("failed_qc", "failed"):
                        no_sr[s.uid] = f"{row.status}:{(row.result or {}).get('code')}"
                next_check = time.monotonic() + 1.0
            time.sleep(0.05)
        time.sleep(0.5)  # heatmap captures of the last study, if any
        rows = by_uid()
        statuses = Counter(str(getattr(r, "status", "?")) for r in rows.values())
        outbox = store.outbox_counts()
        timeline = _timeline(store, time.time() - time.perf_counter())
        complete = not waiting
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()
        pacs.stop()

    with pacs.lock:
        sr_at = dict(pacs.sr_at)
        counts = dict(pacs.counts)
    refused = Counter(r for s in studies for r in s.refusals)
    got = [s for s in sent if s.uid in sr_at]
    to_sr = [(sr_at[s.uid] - s.sent_at) * 1000 for s in got if s.sent_at is not None]
    own = [ms - args.quiet_s * 1000 for ms in to_sr]
    n_images = sum(len(s.files) for s in studies)
    print()
    print(f"{'studies sent':<50}{len(studies):>10}")
    print(f"{'  acknowledged 0x0000 (every image)':<50}{len(sent):>10}")
    print(f"{'  scored (store)':<50}{statuses.get('scored', 0):>10}")
    print(f"{'  SRs received by the PACS (studies)':<50}{len(got):>10}")
    print(f"{'images acknowledged / sent':<50}{len(acks):>6} / {n_images}")
    print(f"{'objects received by the PACS':<50}{counts}")
    print(f"{'store: study statuses':<50}{dict(statuses)}")
    print(f"{'store: outbox':<50}{outbox}")
    if refused:
        print(f"{'C-STORE refusals':<50}{dict(refused)}")
    if no_sr:
        print(f"{'ended without an SR (no SR expected)':<50}{dict(Counter(no_sr.values()))}")
    print()
    print(f"{'latency (ms)':<50}{'p50':>10}{'p95':>10}")
    print(f"{'C-STORE ack, per image':<50}{_pct(acks, 50):>10}{_pct(acks, 95):>10}")
    print(f"{'last-image ack -> SR at the PACS':<50}{_pct(to_sr, 50):>10}{_pct(to_sr, 95):>10}")
    print(f"{'  minus the quiet period (the service)':<50}{_pct(own, 50):>10}{_pct(own, 95):>10}")
    # Where the time went, per study (store timestamps; wall clock mapped onto perf_counter).
    stages = [
        ("  last ack -> scored (quiet period + worker)", "ack", "scored"),
        ("  scored -> SR planned (exporter: SR + captures)", "scored", "planned"),
        ("  SR planned -> marked sent (outbox + C-STORE)", "planned", "sent"),
    ]
    for label, a, b in stages:
        d = [
            (timeline[s.uid][b] - (s.sent_at if a == "ack" else timeline[s.uid][a])) * 1000
            for s in sent
            if s.sent_at is not None
            and b in timeline.get(s.uid, {})
            and (a == "ack" or a in timeline[s.uid])
        ]
        print(f"{label:<50}{_pct(d, 50):>10}{_pct(d, 95):>10}")
    print()
    if first:
        t0 = min(first)
        print(f"{'timeline from the first send (s)':<50}{'first':>10}{'last':>10}")
        marks = [("acknowledged (last image)", [s.sent_at for s in sent if s.sent_at])]
        for key, label in (("scored", "scored"), ("planned", "SR planned"), ("sent", "SR sent")):
            marks.append((label, [v[key] for v in timeline.values() if key in v]))
        marks.append(("SR at the PACS", list(sr_at.values())))
        for label, ts in marks:
            if ts:
                print(f"{'  ' + label:<50}{min(ts) - t0:>10.1f}{max(ts) - t0:>10.1f}")
        positives = [timeline.get(s.uid, {}).get("positives", 0.0) for s in got]
        if positives:
            print(
                f"{'positive findings (= heatmap captures) per study':<50}"
                f"{np.mean(positives):>10.1f}"
            )
    print()
    if got and first:
        span = max(sr_at[s.uid] for s in got) - min(first)
        rate = len(got) / span
        print(
            f"{'sending (first association -> last ack)':<50}{t_sent - min(first):>9.1f} s"
            f"   {len(studies) / (t_sent - min(first)):.2f} studies/s"
        )
        print(f"{'receiver: first send -> last SR':<50}{span:>9.1f} s   {rate:.2f} studies/s")
        print(f"{'runner alone (same inputs, batch 8)':<50}{'':>11} {raw:.2f} studies/s")
        print(f"{'receiver / runner alone':<50}{rate / raw:>10.2f}x")
    if not complete:
        missing = [s for s in sent if s.uid not in sr_at and s.uid not in no_sr]
        print(f"\nTIMED OUT or service ended: {len(missing)} acknowledged studies have no SR")
        for s in missing[:10]:
            row = rows.get(s.uid)
            state = "not in the store" if row is None else f"{row.status} (study {row.id})"
            print(f"  {s.files[0].parent.name}: {state}")
    problems = _log_problems(log_path)
    print(f"\nservice log: {len(problems)} warning/error lines")
    for line in problems[:15]:
        print(f"  {line[:300]}")
    print(f"\nruntime: {time.perf_counter() - t_start:.0f} s")
    if args.keep or not complete or problems:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
