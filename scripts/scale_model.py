"""Time to finish a batch-generation job on G GPUs: a small Monte-Carlo model (docs/scale.md explains each term).

python scripts/scale_model.py                                  # 1M images of SD 1.5 512x512, 8..256 H100-class GPUs
python scripts/scale_model.py --images 100000 --chunk-seconds 4.2 --batch-size 8 --gpus 8 64 --runs 20

The defaults are assumptions to be replaced by `rapiddiff bench scale` numbers measured on the GPUs (a chunk's time,
start-up). It models: start-up (imports, weights read from shared storage by every rank, compile cold or warm), the
steady state (chunks of B images, lognormal jitter), the tail (static round robin for torchrun, a shared queue for Ray),
failures (per-GPU MTBF; torchrun: one torchrun per node, a failure restarts that node's ranks after they commit their
chunk, the failed rank's chunk is redone; Ray: the failed actor restarts, its chunk goes back to the queue), and the
file system (two metadata operations per image and per chunk: create + rename).
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-seconds", type=float, default=4.0, help="one chunk of B images on one GPU (steady state)")
    p.add_argument("--jitter", type=float, default=0.05, help="lognormal sigma of a chunk's time")
    p.add_argument("--import-seconds", type=float, default=20.0, help="process start, imports, CUDA context")
    p.add_argument("--model-gb", type=float, default=2.2, help="weights each rank reads (SD 1.5 fp16: ~2.2 GB)")
    p.add_argument("--storage-gbps", type=float, default=20.0, help="shared storage, all readers together (GB/s)")
    p.add_argument("--node-gbps", type=float, default=5.0, help="one node's read bandwidth (GB/s)")
    p.add_argument("--compile-seconds", type=float, default=90.0, help="compile with a cold cache")
    p.add_argument("--warm-compile-seconds", type=float, default=15.0, help="compile with --compile-cache loaded")
    p.add_argument("--mtbf-hours", type=float, default=50_000.0, help="mean GPU-hours between failures of one GPU")
    p.add_argument("--restart-seconds", type=float, default=120.0, help="scheduler notices and restarts the workers")
    p.add_argument(
        "--fs-ops", type=float, default=5000.0, help="file creates + renames per second the file system takes"
    )
    p.add_argument("--runs", type=int, default=10, help="Monte-Carlo runs per cell")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def startup(a: argparse.Namespace, gpus: int, warm: bool) -> float:
    """Imports + every rank reading the weights (node or shared storage bound) + compile."""
    nodes = math.ceil(gpus / a.gpus_per_node)
    per_node = min(gpus, a.gpus_per_node) * a.model_gb
    load = max(per_node / a.node_gbps, nodes * per_node / a.storage_gbps)
    return a.import_seconds + load + (a.warm_compile_seconds if warm else a.compile_seconds)


def chunk_time(a: argparse.Namespace, rng: random.Random) -> float:
    return a.chunk_seconds * rng.lognormvariate(-(a.jitter**2) / 2, a.jitter)


def next_failure(a: argparse.Namespace, rng: random.Random) -> float:
    return rng.expovariate(1 / (a.mtbf_hours * 3600))


def torchrun_finish(a: argparse.Namespace, gpus: int, rng: random.Random) -> tuple[float, float, int]:
    """(time to finish, idle tail, failures): static round robin, one torchrun per node restarting on a failure."""
    chunks = math.ceil(a.images / a.batch_size)
    start, warm_start = startup(a, gpus, warm=False), startup(a, gpus, warm=True)
    finish = []
    failures = 0
    for node in range(math.ceil(gpus / a.gpus_per_node)):
        ranks = range(node * a.gpus_per_node, min(gpus, (node + 1) * a.gpus_per_node))
        work = [sum(chunk_time(a, rng) for _ in range(len(range(r, chunks, gpus)))) for r in ranks]
        # Failures on this node over its run: each costs the node a restart (ranks commit their chunk first) and
        # the failed rank half a chunk on average.
        t, delay, horizon = 0.0, 0.0, start + max(work)
        rate = len(ranks) / (a.mtbf_hours * 3600)
        while True:
            t += rng.expovariate(rate)
            if t > horizon + delay:
                break
            failures += 1
            delay += a.restart_seconds + warm_start + a.chunk_seconds * rng.random()
        finish += [start + w + delay for w in work]
    return max(finish), max(finish) - min(finish), failures


def ray_finish(a: argparse.Namespace, gpus: int, rng: random.Random) -> tuple[float, float, int]:
    """(time to finish, idle tail, failures): a shared queue of chunks, one actor per GPU restarting alone."""
    chunks = math.ceil(a.images / a.batch_size)
    start, warm_start = startup(a, gpus, warm=False), startup(a, gpus, warm=True)
    actors = [(start, i, start + next_failure(a, rng)) for i in range(gpus)]
    heapq.heapify(actors)
    done, failures, last = 0, 0, []
    while done < chunks:
        free, i, fail = heapq.heappop(actors)
        d = chunk_time(a, rng)
        if fail < free + d:  # the actor dies during the chunk: the chunk goes back to the queue
            failures += 1
            back = fail + a.restart_seconds + warm_start
            heapq.heappush(actors, (back, i, back + next_failure(a, rng)))
            continue
        done += 1
        heapq.heappush(actors, (free + d, i, fail))
    last = [free for free, _, _ in actors]
    return max(last), max(last) - min(last), failures


def fs_bound(a: argparse.Namespace) -> float:
    """Images per second the file system allows: create + rename per image, plus per chunk for its manifest part."""
    return a.fs_ops / (2 + 2 / a.batch_size)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    rng = random.Random(a.seed)
    one_gpu = a.batch_size / a.chunk_seconds
    print(f"{a.images} images, B={a.batch_size}, {a.chunk_seconds:g} s a chunk ({one_gpu:.2f} images/s a GPU), "
          f"MTBF {a.mtbf_hours:g} GPU-h, file system {fs_bound(a):.0f} images/s at most")  # fmt: skip
    print("| GPUs | engine | start-up (s) | time to finish (mean / p90) | efficiency | idle tail (s) | failures |")
    print("|---|---|---|---|---|---|---|")
    for gpus in a.gpus:
        ideal = a.images / (one_gpu * gpus)
        for name, fn in (("torchrun", torchrun_finish), ("ray", ray_finish)):
            runs = [fn(a, gpus, rng) for _ in range(a.runs)]
            times = sorted(max(t, startup(a, gpus, False) + a.images / fs_bound(a)) for t, _, _ in runs)
            mean, p90 = statistics.mean(times), times[min(len(times) - 1, int(0.9 * len(times)))]
            tail = statistics.mean(r[1] for r in runs)
            fails = statistics.mean(r[2] for r in runs)
            print(f"| {gpus} | {name} | {startup(a, gpus, False):.0f} | {_hms(mean)} / {_hms(p90)} | "
                  f"{ideal / mean:.0%} | {tail:.0f} | {fails:.1f} |")  # fmt: skip


def _hms(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


if __name__ == "__main__":
    main()
