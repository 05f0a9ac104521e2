"""Load on the clinic service over loopback: N concurrent clients, bounded count and duration,
against the runner's raw throughput on the same inputs measured in the same run.

    .venv/bin/python benchmarks/service_load.py --model path/to/model.onnx --clients 8 --studies 160

The service runs as a real `diagnostics serve` process (SQLite in WAL mode, in-process worker)
in a temp folder. Each client uploads distinct studies (noise variants of a real NIH PNG, or
synthetic chests without ../shared) and waits for each until it is final: one long-poll
(`GET /v1/studies/{id}?wait=30`) by default, or, with `--wait 0`, polling every `--poll`
seconds as clients did before long-poll existed. Reported: studies/s, p50/p99 acknowledgement
latency (upload -> 202), p50/p99 time to result (upload -> final), GET requests per study,
and service throughput / raw runner throughput.

Runner baselines, on the same bytes in this process, with the service's batch size and model
threads (`--batch`, `--model-threads`): the runner alone as the issue measured it (no
heatmaps, default QC), decoding one image at a time as the service does and side by side as
`diagnostics score` does; and the runner doing the per-image work the service does (the
service's QC config, and a heatmap PNG written per positive finding).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from timing import noisy_pngs  # benchmarks/timing.py (scripts run from this folder)

from diagnostics.serve.runner import OnnxModel, Scorer, available_cores

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _payloads(n: int, seed: int = 0) -> list[bytes]:
    """n distinct PNGs: noise variants of a real NIH chest (a synthetic one without it)."""
    from PIL import Image

    nih = SHARED / "cxr" / "nih_sample" / "images" / "00000211_013.png"
    if nih.is_file():
        base = np.asarray(Image.open(nih).convert("L"), dtype=np.float32) / 255.0
    else:
        from diagnostics.data.synthetic import SynthSpec, generate

        base = generate(1, SynthSpec(size=512), seed)[0][1].pixels
    return noisy_pngs(base, n, 0.004, seed)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per live thread of a process, the main one named (Linux
    /proc; else empty). Threads that ended between two readings are missing from the later one:
    the per-thread figures are a lower bound, the process total (`_cpu_seconds`) is not."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = "main" if tid == str(pid) else f"thread {tid}"
        fields = stat.rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tck
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an exported .onnx (default: random ResNet-18)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="the service's model.batch_size")
    parser.add_argument(
        "--model-threads", type=int, default=0, help="the service's model.threads (0: its rule)"
    )
    parser.add_argument("--studies", type=int, default=160, help="upper bound on uploads")
    parser.add_argument("--duration", type=float, default=120.0, help="upper bound, seconds")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between status polls")
    parser.add_argument(
        "--wait",
        type=float,
        default=30.0,
        help="long-poll seconds per GET (?wait=); 0: poll every --poll seconds (the old client)",
    )
    args = parser.parse_args()
    import httpx

    if args.model is None:
        from diagnostics.train.export import random_export

        args.model = random_export(
            "resnet18", 224, ["Pneumonia"], Path(tempfile.mkdtemp()) / "resnet18.onnx"
        )
    payloads = _payloads(args.studies)
    print(f"{len(payloads)} distinct studies of {len(payloads[0]) / 1e6:.1f} MB each")

    # Baseline: the runner alone, in this process, on the same bytes.
    model_threads = args.model_threads or None  # as the service's rule picks for one worker
    # One image decoded at a time, as the service's worker does (models.ModelHolder); and
    # side by side, as `diagnostics score` does (a batch runner with nothing else to serve).
    sample = payloads[: min(64, len(payloads))]
    raw = raw_side = 0.0
    for parallel in (False, True):
        scorer = Scorer(
            OnnxModel(args.model, device="cpu", threads=model_threads),
            batch_size=args.batch,
            parallel_decode=parallel,
        )
        scorer.score_many(payloads[:8])  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        results = scorer.score_many(sample)
        rate = len(sample) / (time.perf_counter() - t0)
        runner_cpu = (time.process_time() - c0) / len(sample) * 1000
        outcomes = sorted({str(r.status if r.status == "scored" else r.code) for r in results})
        how = "images side by side, as `score`" if parallel else "one image at a time, as served"
        print(
            f"runner alone ({how}): {rate:.1f} studies/s, {runner_cpu:.1f} ms CPU per study "
            f"(batch {args.batch}; outcomes {outcomes})"
        )
        raw, raw_side = (raw, rate) if parallel else (rate, raw_side)
    from diagnostics.serve.qc import QCConfig

    heat = Path(tempfile.mkdtemp(prefix="service_load_heat_"))
    same = Scorer(
        OnnxModel(args.model, device="cpu", threads=model_threads),
        QCConfig(ood=True),
        heatmap_dir=heat,
        batch_size=args.batch,
        parallel_decode=False,
    )
    same.score_many(payloads[:8], [f"w{i}" for i in range(8)])
    t0 = time.perf_counter()
    same.score_many(sample, [f"s{i}" for i in range(len(sample))])
    raw_same = len(sample) / (time.perf_counter() - t0)
    print(f"runner with the service's per-image work (QC ood, heatmaps): {raw_same:.1f} studies/s")

    work = Path(tempfile.mkdtemp(prefix="service_load_"))
    port = _free_port()
    cfg = {
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(work / "serve"),
        "model": {
            "path": str(args.model),
            "device": "cpu",
            "batch_size": args.batch,
            "threads": args.model_threads,
        },
        "limits": {"rate_per_minute": 100000, "max_queue": 100000, "disk_reserve_mb": 100},
        "worker": {"poll_s": 0.05},
        "qc": {"ood": True},
    }
    (work / "serve.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DIAGNOSTICS_HOME": str(work)}
    cli = [sys.executable, "-m", "diagnostics"]
    made = subprocess.run(
        [
            *cli,
            "keys",
            "create",
            "--role",
            "submitter",
            "--clinic",
            "bench",
            "--config",
            str(work / "serve.yaml"),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = made.stdout.splitlines()[1].strip()
    log = open(work / "server.log", "wb")  # noqa: SIM115 (closed after the server stops)
    server = subprocess.Popen(
        [*cli, "serve", "--config", str(work / "serve.yaml")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                print((work / "server.log").read_text()[-3000:])
                return 1
            time.sleep(0.2)
        ack: list[float] = []
        to_result: list[float] = []
        finals: dict[str, int] = {}
        gets = [0]
        lock = threading.Lock()
        queue = list(payloads)
        stop_at = time.monotonic() + args.duration
        headers = {"Authorization": f"Bearer {key}"}

        def client() -> None:
            with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
                while time.monotonic() < stop_at:
                    with lock:
                        if not queue:
                            return
                        data = queue.pop()
                    t0 = time.perf_counter()
                    r = http.post("/v1/studies", files={"file": ("x.png", data, "image/png")})
                    t_ack = time.perf_counter() - t0
                    if r.status_code != 202:
                        with lock:
                            finals[f"http {r.status_code}"] = (
                                finals.get(f"http {r.status_code}", 0) + 1
                            )
                        continue
                    sid = r.json()["id"]
                    n = 0
                    params = {"wait": args.wait} if args.wait > 0 else {}
                    while True:
                        doc = http.get(f"/v1/studies/{sid}", params=params).json()
                        n += 1
                        if doc["status"] in ("scored", "failed_qc", "failed"):
                            break
                        if args.wait <= 0:
                            time.sleep(args.poll)
                    with lock:
                        ack.append(t_ack * 1000)
                        to_result.append((time.perf_counter() - t0) * 1000)
                        finals[doc["status"]] = finals.get(doc["status"], 0) + 1
                        gets[0] += n

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        cpu0 = (_cpu_seconds(server.pid), time.process_time())
        threads0 = _thread_cpu(server.pid)
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        cpu = (_cpu_seconds(server.pid) - cpu0[0], time.process_time() - cpu0[1])
        by_thread = {k: v - threads0.get(k, 0.0) for k, v in _thread_cpu(server.pid).items()}
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    done = len(to_result)
    rate = done / wall
    mode = f"long-poll ?wait={args.wait:g}" if args.wait > 0 else f"polling every {args.poll:g} s"
    print(
        f"service: {args.clients} clients ({mode}), {done} studies in {wall:.1f} s -> "
        f"{rate:.1f} studies/s"
    )
    print(f"  outcomes: {finals}")
    p50, p99 = np.percentile(ack, [50, 99])
    print(f"  acknowledgement: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    print(
        f"  time to result:  p50 {np.percentile(to_result, 50):.0f} ms, "
        f"p99 {np.percentile(to_result, 99):.0f} ms"
    )
    print(f"  GET requests per study: {gets[0] / max(done, 1):.1f}")
    n = max(done, 1)
    print(
        f"  CPU per study: service {cpu[0] / n * 1000:.1f} ms, clients {cpu[1] / n * 1000:.1f} ms "
        f"(of {available_cores()} cores x {wall / n * 1000:.1f} ms wall per study)"
    )
    busy = sorted(by_thread.items(), key=lambda kv: -kv[1])
    print(
        "  service CPU per study by thread: "
        + ", ".join(f"{k} {v / n * 1000:.1f} ms" for k, v in busy if v / n * 1000 >= 0.5)
    )
    print(f"  service / runner alone: {rate / raw:.2f}x")
    print(f"  service / runner alone, images side by side: {rate / raw_side:.2f}x")
    print(f"  service / runner with the service's per-image work: {rate / raw_same:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
