"""`rapiddiff bench scale --model PATH --workers 1 2`: batch generation under torchrun at several worker counts.

For each worker count W it runs `torchrun --standalone --nproc-per-node W -m rapiddiff generate --prompts ...` on a
synthetic prompt file and reads the timestamps the workers leave in the manifest: start-up (launch to pipeline loaded:
imports, weight loading), the first chunk (with --compile: the compile), steady-state images/s after it, per-worker efficiency against W = 1, the idle tail (from
the first worker done to the last), and whether the images are the same as with the first W. See docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import checks

DEFAULT_OUT = "bench-scale"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("scale", help="batch generation throughput at several torchrun worker counts",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, help="a checkpoint folder or Hub id")
    parser.add_argument("--workers", nargs="+", type=checks.positive_int, default=[1, 2], metavar="W",
                        help="worker counts (torchrun --nproc-per-node; default 1 2)")  # fmt: skip
    parser.add_argument("--images", type=checks.positive_int, default=32, help="images per run (default 32)")
    parser.add_argument("--batch-size", type=checks.positive_int, default=4, help="default 4")
    parser.add_argument("--steps", type=checks.positive_int, default=4, help="default 4")
    parser.add_argument("--height", type=checks.positive_int, help="default: the model's")
    parser.add_argument("--width", type=checks.positive_int, help="default: the model's")
    parser.add_argument("--compile", action="store_true",
                        help="compile; the first run builds a compile cache (cold), the others load it (warm)")  # fmt: skip
    parser.add_argument("-o", "--output", type=Path, default=Path(DEFAULT_OUT), help=f"default {DEFAULT_OUT}")
    parser.set_defaults(func=scale_command)
    return parser


def scale_command(args: argparse.Namespace) -> int:
    try:
        checks.check_output_folder(args.output)
    except ValueError as e:
        print(f"rapiddiff bench scale: error: {e}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    prompts = args.output / "prompts.txt"
    prompts.write_text("".join(f"scale benchmark prompt {i}\n" for i in range(args.images)))
    rows = []
    for workers in args.workers:
        folder = args.output / f"w{workers}"
        shutil.rmtree(folder, ignore_errors=True)
        cache_cold = args.compile and not (args.output / "compile-cache.bin").exists()
        start = time.time()
        result = subprocess.run(_command(args, prompts, folder, workers), env=os.environ | {"OMP_NUM_THREADS": "1"},
                                capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            print(result.stderr[-4000:], file=sys.stderr)
            print(f"rapiddiff bench scale: the run with {workers} worker(s) failed", file=sys.stderr)
            return 1
        records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
        row = summarize(records, start, time.time(), workers)
        row["compile"] = ("cold" if cache_cold else "warm") if args.compile else "off"
        row["same_images"] = [r["sha256"] for r in records] == rows[0]["hashes"] if rows else True
        row["hashes"] = [r["sha256"] for r in records]
        rows.append(row)
    base = rows[0]["steady_images_per_s"] / rows[0]["workers"]
    for row in rows:
        row["efficiency"] = row["steady_images_per_s"] / (row["workers"] * base)
    table = format_table(rows)
    print(table)
    (args.output / "scale.md").write_text(table + "\n")
    results = [{k: v for k, v in r.items() if k != "hashes"} for r in rows]
    (args.output / "scale.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nresults: {args.output / 'scale.json'}")
    return 0


def _command(args: argparse.Namespace, prompts: Path, folder: Path, workers: int) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers),
               "-m", "rapiddiff", "generate", "--prompts", str(prompts), "--model", args.model, "-o", str(folder),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--seed", "0"]  # fmt: skip
    for name in ("height", "width"):
        if getattr(args, name):
            command += [f"--{name}", str(getattr(args, name))]
    if args.compile:
        command += ["--compile", "--compile-cache", str(args.output / "compile-cache.bin")]
    return command


def summarize(records: list[dict[str, Any]], launch: float, finish: float, workers: int) -> dict[str, Any]:
    """Timing of one run from its manifest's worker fields (time.time() stamps) and the launch / exit times.

    A worker's first chunk is reported on its own (`first_chunk_s`): it pays the lazy costs of the first call (with
    --compile: the compile, cold or from the cache). The steady state is measured over the later chunks (over all of
    them for a worker that had one chunk only)."""
    chunks: dict[str, dict[float, list[float]]] = {}  # worker -> chunk_start -> [chunk_end, images]
    ready: dict[str, float] = {}
    for r in records:
        w = r["worker"]
        ready[w["name"]] = w["ready"]
        chunk = chunks.setdefault(w["name"], {}).setdefault(w["chunk_start"], [w["chunk_end"], 0])
        chunk[1] += 1
    rate, first, ends = 0.0, [], []
    for name, by_start in chunks.items():
        ordered = [(start, end, n) for start, (end, n) in sorted(by_start.items())]
        first.append(ordered[0][1] - ordered[0][0])
        ends.append(max(end for _, end, _ in ordered))
        later = ordered[1:] or ordered
        since = ordered[0][1] if len(ordered) > 1 else ready[name]
        rate += sum(n for _, _, n in later) / max(ends[-1] - since, 1e-9)
    return {
        "workers": workers,
        "images": len(records),
        "wall_s": finish - launch,
        "startup_s": sum(ready.values()) / len(ready) - launch,
        "first_chunk_s": sum(first) / len(first),
        "steady_images_per_s": rate,
        "idle_tail_s": max(ends) - min(ends),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workers | images | wall (s) | start-up (s) | first chunk (s) | compile | images/s (steady) | efficiency "
             "| idle tail (s) | same images |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['workers']} | {r['images']} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | "
                     f"{r['first_chunk_s']:.1f} | {r['compile']} | "
                     f"{r['steady_images_per_s']:.2f} | {r['efficiency']:.0%} | {r['idle_tail_s']:.1f} | "
                     f"{'yes' if r['same_images'] else 'NO'} |")  # fmt: skip
    return "\n".join(lines)
