"""Load test of `rapiddiff serve`: C concurrent clients for T seconds against the batching server, then the same against
--max-batch-size 1 (the baseline); prints a Markdown table (docs/serve.md has one).

python scripts/load_test.py                                   # a tiny random model, 8 clients, 60 s per server
python scripts/load_test.py --model ./sd15 --clients 16 --seconds 120 --size 512x512 --steps 30

Each server is `rapiddiff serve` in a subprocess listening on 127.0.0.1 only, started, warmed up (`--warmup` seconds
of the same load, not counted), measured, then stopped with SIGTERM (it must exit 0). Every client sends one request
at a time (n=1, its own seeds) and sends the next when the answer comes; a request sent before the T seconds are over
is waited for. Reported: images/s, latency percentiles, answers by status, the server's peak RSS and its RSS growth
from the end of the warm-up to the end of the run. Without --model, a tiny random-weight SD checkpoint is written by
Diffusers (the tests' `tiny_sd_components`; needs the test extra) into a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only: the load test never listens on another address
ENDPOINT = "/v1/images/generations"


@dataclass
class Result:
    name: str
    max_batch_size: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    rss_after_warmup_mb: float = 0.0
    rss_end_mb: float = 0.0
    peak_rss_mb: float = 0.0
    exit_code: int | None = None

    @property
    def images_per_second(self) -> float:
        return self.statuses[200] / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else float("nan")
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[round(q) - 1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a checkpoint folder or Hub id (default: a tiny random model, written here)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds per server")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of load before measuring")
    p.add_argument("--max-batch-size", type=int, default=8, help="the batching server's --max-batch-size")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="the batching server's --batch-wait-ms")
    p.add_argument("--size", default="32x32", help="the tiny model's trained size")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="the servers' torch CPU threads (OMP_NUM_THREADS)")
    p.add_argument("--no-baseline", action="store_true", help="skip the --max-batch-size 1 server")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def tiny_model(folder: Path) -> Path:
    """The tests' tiny SD checkpoint, written by Diffusers."""
    sys.path.insert(0, str(ROOT / "tests"))
    import diffusers
    from conftest import tiny_sd_components

    pipe = diffusers.StableDiffusionPipeline(
        **tiny_sd_components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """The process's resident memory (VmRSS) or its peak (VmHWM), from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def server(
    model: str, max_batch_size: int, batch_wait_ms: float, threads: int, log: Path
) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "rapiddiff", "serve", "--model", model, "--host", HOST, "--port", str(port),
               "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(batch_wait_ms)]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}); see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not get ready in 300 s; see {log}")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def drive(url: str, clients: int, seconds: float, request: dict, seed_base: int) -> tuple[list[float], Counter, float]:
    """`clients` threads, each sending one request at a time until `seconds` are over; (latencies of the 200s,
    statuses, elapsed seconds until the last answer)."""
    stop_at = time.monotonic() + seconds
    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            k = 0
            while time.monotonic() < stop_at:
                start = time.monotonic()
                try:
                    status = http.post(ENDPOINT, json=request | {"seed": seed_base + index * 1_000_000 + k}).status_code
                except httpx.TransportError as e:
                    status = type(e).__name__
                elapsed = time.monotonic() - start
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(elapsed)
                k += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, statuses, time.monotonic() - start


def run_one(
    name: str, args: argparse.Namespace, model: str, max_batch_size: int, batch_wait_ms: float, log_dir: Path
) -> Result:
    result = Result(name, max_batch_size)
    request = {"prompt": "a red cube on a table", "size": args.size, "num_inference_steps": args.steps}
    print(f"{name}: starting (--max-batch-size {max_batch_size}, --batch-wait-ms {batch_wait_ms:g})", flush=True)
    with server(model, max_batch_size, batch_wait_ms, args.threads, log_dir / f"{name}.log") as (url, process):
        peak = [0.0]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.25):
                peak[0] = max(peak[0], rss_mb(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        drive(url, args.clients, args.warmup, request, seed_base=10**9)
        result.rss_after_warmup_mb = rss_mb(process.pid)
        print(f"{name}: warmed up ({args.warmup:g} s), RSS {result.rss_after_warmup_mb:.0f} MB; measuring", flush=True)
        result.latencies, result.statuses, result.seconds = drive(url, args.clients, args.seconds, request, 0)
        result.rss_end_mb = rss_mb(process.pid)
        sampling.set()
        sampler.join()
        result.peak_rss_mb = max(peak[0], rss_mb(process.pid, "VmHWM"))
    result.exit_code = process.returncode
    print(f"{name}: {result.images_per_second:.2f} images/s, exit code {result.exit_code}", flush=True)
    return result


def table(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        f"{args.clients} clients x {args.seconds:g} s per server (after {args.warmup:g} s of warm-up), n=1, "
        f"{args.size}, {args.steps} steps, {args.threads} torch thread(s) per server",
        "",
        "| server | images/s | p50 (s) | p95 (s) | p99 (s) | answers by status | peak RSS (MB) | RSS growth after warm-up |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        statuses = ", ".join(f"{s}: {c}" for s, c in sorted(r.statuses.items(), key=str))
        growth = 100 * (r.rss_end_mb - r.rss_after_warmup_mb) / r.rss_after_warmup_mb
        lines.append(
            f"| {r.name} | {r.images_per_second:.2f} | {r.percentile(50):.3f} | {r.percentile(95):.3f} | "
            f"{r.percentile(99):.3f} | {statuses} | {r.peak_rss_mb:.0f} | {growth:+.1f} % |"
        )
    if len(results) == 2 and results[1].images_per_second:
        lines += [
            "",
            f"throughput: {results[0].images_per_second / results[1].images_per_second:.2f}x the batch-1 server",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rapiddiff-load-") as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "tiny-sd"))
        results = [
            run_one(
                f"batching (B={args.max_batch_size})", args, model, args.max_batch_size, args.batch_wait_ms, Path(tmp)
            )
        ]
        if not args.no_baseline:
            results.append(run_one("batch-1 baseline", args, model, 1, 0.0, Path(tmp)))
    print()
    print(table(results, args))
    if args.json:
        args.json.write_text(
            json.dumps(
                [asdict(r) | {"statuses": {str(k): v for k, v in r.statuses.items()}} for r in results], indent=1
            )
        )
    ok = all(r.exit_code == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
