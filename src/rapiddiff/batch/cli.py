"""Command line of batch generation: the `--prompts` options of `rapiddiff generate`, and `rapiddiff manifest`.

torchrun --nproc-per-node 8 --no-python rapiddiff generate --prompts prompts.jsonl --model ./sd15 -o out/ --batch-size 8
rapiddiff generate --prompts prompts.txt --model ./sd15 -o out/ --engine ray --workers 4
rapiddiff manifest out/ --verify
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import checks
from .run import (
    BatchJob,
    BatchSettings,
    Layout,
    Worker,
    log_stderr,
    merge_manifest,
    pixel_hash,
    read_run_file,
    run_workers,
)

ENGINES = ("torchrun", "ray")
DEFAULT_BATCH_SIZE = 4
# The `BatchSettings` that options give as they are, under their own names.
PLAIN_SETTINGS = ("model", "batch_size", "steps", "guidance", "negative_prompt", "num_images", "height", "width",
                  "scheduler", "attention", "compile")  # fmt: skip


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch options of `rapiddiff generate` (used with --prompts FILE instead of the positional prompt)."""
    group = parser.add_argument_group("batch generation from a prompt file (see docs/scale.md)")
    group.add_argument("--prompts", type=Path, metavar="FILE",
                       help="a JSON Lines file (.jsonl: prompt, id, negative_prompt, seed, num_images, steps, guidance)"
                            " or a text file, one prompt a line; -o is then a folder")  # fmt: skip
    group.add_argument("--batch-size", type=checks.positive_int, default=DEFAULT_BATCH_SIZE,
                       help=f"images per model call; chunks of this many images are the unit of work and of resume "
                            f"(default {DEFAULT_BATCH_SIZE})")  # fmt: skip
    group.add_argument("--num-shards", type=checks.positive_int, default=1,
                       help="several machines: one torchrun per machine, each with --shard-index (default 1)")  # fmt: skip
    group.add_argument("--shard-index", type=int, default=0, help="this machine's shard in [0, --num-shards)")
    group.add_argument("--engine", choices=ENGINES, default="torchrun",
                       help="torchrun: this process is one worker (RANK / WORLD_SIZE from torchrun's environment); "
                            "ray: a Ray Data job with --workers actors (pip install 'rapiddiff[ray]')")  # fmt: skip
    group.add_argument("--workers", type=checks.positive_int, default=1, help="--engine ray: the number of actors")
    group.add_argument("--compile-cache", type=Path, metavar="FILE",
                       help="with --compile: load compile artifacts from FILE, or save them there after the first "
                            "chunk if it does not exist (share it between ranks and runs)")  # fmt: skip


def check_batch_args(args: argparse.Namespace) -> None:
    """Errors in how the batch options combine with the rest of `generate`."""
    if args.prompts is None:
        batch_only = {"--engine": args.engine != "torchrun", "--workers": args.workers != 1,
                      "--num-shards": args.num_shards != 1, "--compile-cache": args.compile_cache is not None}  # fmt: skip
        used = [name for name, given in batch_only.items() if given]
        if used:
            raise ValueError(f"{', '.join(used)} apply to --prompts FILE only")
        if args.prompt is None:
            raise ValueError("give a prompt, or --prompts FILE")
        return
    if args.prompt is not None:
        raise ValueError(f"give a prompt ({args.prompt!r}) or --prompts {args.prompts}, not both")
    images = [name for name in ("image", "mask", "controlnet", "control_image") if getattr(args, name, None)]
    if images:
        raise ValueError(f"--prompts does not take image inputs (--{images[0].replace('_', '-')}): text-to-image only")
    if args.output.suffix:
        raise ValueError(f"-o/--output {args.output}: with --prompts, the output is a folder (no file suffix)")
    if args.compile_cache is not None and not args.compile:
        raise ValueError("--compile-cache needs --compile")
    if args.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError("--engine ray needs Ray Data, which is not installed: pip install 'rapiddiff[ray]'")
    if args.engine == "torchrun" and args.workers != 1:
        raise ValueError("--workers is for --engine ray; with torchrun, the worker count is --nproc-per-node")


def run_command(args: argparse.Namespace, load_pipeline: Callable[..., Any], dtypes: dict[str, torch.dtype]) -> int:
    """`rapiddiff generate --prompts FILE ...`: every check, then this process's share of the work."""
    worker = Worker.from_env(args.num_shards, args.shard_index)
    device = checks.resolve_device(args.device, worker.local_rank) if args.engine == "torchrun" else None
    device_type = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device_type == "cuda" else "float32")
    checks.check_seed(args.seed)
    settings = BatchSettings(
        **{name: getattr(args, name) for name in PLAIN_SETTINGS},
        seed=args.seed if args.seed is not None else 0,
        dtype=dtype,
        device_type=device_type,
    )
    job = BatchJob.prepare(settings, args.prompts, args.output, args.compile_cache, worker, args.overwrite)
    try:
        if args.engine == "ray":
            from .ray_engine import run_ray

            return run_ray(job, args, load_pipeline, dtypes[dtype], args.workers, log_stderr)
        load = functools.partial(load_pipeline, args, device, dtypes[dtype])
        return run_workers(job, worker, load, log_stderr)
    finally:
        job.release()


# --- rapiddiff manifest DIR [--verify] ----------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "manifest",
        help="merge and check the manifest of a `generate --prompts` output folder",
        description="Merge DIR/parts into DIR/manifest.jsonl when every chunk is committed; with --verify, report "
        "missing and duplicated images, missing files and pixel hashes that do not match.",
    )
    parser.add_argument("folder", type=Path, help="the --output folder of `rapiddiff generate --prompts`")
    parser.add_argument("--verify", action="store_true", help="check every image (reads and hashes every file)")
    parser.set_defaults(func=manifest_command)
    return parser


def manifest_command(args: argparse.Namespace) -> int:
    """Merge when complete; with --verify, check the committed parts against the image files. A file that cannot be
    read is named with what is wrong (exit 2 for run.json, a verify problem for the others), never a traceback."""
    layout = Layout(args.folder)
    if not layout.run_file.is_file():
        print(f"rapiddiff manifest: error: {args.folder} has no {layout.run_file.name} (not a batch output folder)")
        return 2
    try:
        run = read_run_file(layout.run_file)
        expected, batch_size = run["prompts"]["images"], run["settings"]["batch_size"]
        num_chunks = -(-expected // batch_size)
        merged = merge_manifest(layout, num_chunks)
    except (ValueError, OSError) as e:
        print(f"rapiddiff manifest: error: {e}")
        return 2
    if merged:
        print(f"{layout.manifest}: {expected} image(s), all {num_chunks} chunk(s) committed")
    else:
        print(f"{len(layout.committed())} of {num_chunks} chunk(s) committed; rerun the generate command to finish")
    if not args.verify:
        return 0
    problems = verify(layout, expected)
    if not merged and layout.manifest.is_file():
        problems.append(
            f"{layout.manifest.name} is stale: it was merged when every chunk was committed, and some are not now"
        )
    for line in problems[:50]:
        print(line)
    if len(problems) > 50:
        print(f"... and {len(problems) - 50} more")
    print(f"verify: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def verify(layout: Layout, expected: int) -> list[str]:
    """Missing and duplicated image numbers, unreadable parts, missing or unreadable files and pixel-hash mismatches,
    from the committed parts (the source of truth; manifest.jsonl is only their merge)."""
    import PIL.Image

    seen: dict[int, int] = {}
    problems: list[str] = []
    for record in _records(layout, problems):
        n = record["n"]
        seen[n] = seen.get(n, 0) + 1
        path = layout.root / record["file"]
        if not path.is_file():
            problems.append(f"image {n} (line {record['line']}): file {record['file']} is missing")
            continue
        try:
            with PIL.Image.open(path) as image:
                digest = pixel_hash(image)
        except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt: PIL raises OSError / SyntaxError
            problems.append(f"image {n} (line {record['line']}): {record['file']} cannot be read ({e})")
            continue
        if digest != record["sha256"]:
            problems.append(f"image {n} (line {record['line']}): {record['file']} has other pixels than recorded")
    missing = [n for n in range(expected) if n not in seen]
    if missing:
        problems.append(f"missing: {len(missing)} image(s), numbers {_ranges(missing)}")
    duplicated = sorted(n for n, count in seen.items() if count > 1)
    if duplicated:
        problems.append(f"duplicated: {len(duplicated)} image(s), numbers {_ranges(duplicated)}")
    return problems


RECORD_KEYS = {"n": int, "line": int, "file": str, "sha256": str}


def _records(layout: Layout, problems: list[str]) -> Iterator[dict[str, Any]]:
    """The records of the committed parts; a line that is not a whole record (a truncated part) is a problem naming
    the part and the line."""
    for chunk in sorted(layout.committed()):
        part = layout.part(chunk)
        name = part.relative_to(layout.root).as_posix()
        try:
            text = part.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{name}: cannot be read ({e})")
            continue
        if text and not text.endswith("\n"):
            problems.append(f"{name}: truncated (its last line has no end)")
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{name} line {number}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            bad = [
                k for k, t in RECORD_KEYS.items() if not isinstance(record, dict) or not isinstance(record.get(k), t)
            ]
            if bad:
                problems.append(f"{name} line {number}: not a manifest record (missing or wrong {', '.join(bad)})")
                continue
            yield record


def _ranges(numbers: list[int]) -> str:
    spans, start = [], numbers[0]
    for a, b in zip(numbers, numbers[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(spans[:20]) + (" ..." if len(spans) > 20 else "")
