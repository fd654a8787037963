"""`rapiddiff bench`: the seed's benchmark, rapiddiff and diffusers side by side.

rapiddiff bench                                    # GPU: the seed's matrix; CPU: the `cpu` preset, minutes
rapiddiff bench --pipelines sd_txt2img if --batch-sizes 1 4 --modes compiled -o out1
rapiddiff bench merge out1/results.json out2/results.json -o report
rapiddiff bench scale --model ./sd15 --workers 1 2 4 8    # batch generation under torchrun (docs/scale.md)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ..batch.scale import add_parser as add_scale_parser
from .backends import BACKENDS
from .modes import MODES
from .presets import CHECKPOINTS, PRESETS, resolve_preset
from .report import batch_tables, load_document, merge_documents, write_outputs
from .settings import PIPELINES, Settings
from .sweep import run

DEFAULT_OUT = "bench-out"


def _model_arg(text: str) -> tuple[str, str]:
    key, sep, path = text.partition("=")
    if not sep or key not in CHECKPOINTS or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH with NAME one of {', '.join(CHECKPOINTS)}")
    return key, path


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the denoising loop (iterations/s), rapiddiff vs diffusers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                        help="auto: gpu with CUDA, else cpu; tiny: seconds, for tests")  # fmt: skip
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=PIPELINES, metavar="NAME",
                        help=f"default: all of {', '.join(PIPELINES)}")  # fmt: skip
    parser.add_argument("--batch-sizes", nargs="+", type=int, metavar="N", help="default: the preset's")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), metavar="MODE",
                        help=f"{', '.join(MODES)}; default: the preset's")  # fmt: skip
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=BACKENDS, metavar="NAME",
                        help="default: rapiddiff diffusers")  # fmt: skip
    parser.add_argument("--steps", type=int, help="steps of the long call for every pipeline (default: the preset's)")
    parser.add_argument("--repeats", type=int, help="timed (short, long) pairs per cell; the median is reported")
    parser.add_argument("--warmup", type=int, help="untimed calls per cell before timing")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: the preset's; gpu: torch's own)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: the preset's")
    parser.add_argument("--model", action="append", type=_model_arg, default=[], metavar="NAME=PATH",
                        help=f"a real Diffusers checkpoint instead of random weights; NAME: {', '.join(CHECKPOINTS)}")  # fmt: skip
    parser.add_argument("-o", "--output", default=DEFAULT_OUT, type=Path, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_command)

    sub = parser.add_subparsers(dest="bench_command", metavar="{merge,scale}")
    merge = sub.add_parser("merge", help="merge split runs' results.json into one report")
    merge.add_argument("inputs", nargs="+", type=Path, metavar="RESULTS_JSON")
    merge.add_argument("-o", "--output", required=True, type=Path, help="output folder of the merged report")
    merge.set_defaults(func=merge_command)
    add_scale_parser(sub)
    return parser


def run_command(args: argparse.Namespace) -> int:
    settings = Settings.create(
        resolve_preset(args.preset, torch.cuda.is_available()),
        device=args.device,
        dtype=args.dtype,
        pipelines=tuple(args.pipelines),
        batch_sizes=tuple(args.batch_sizes) if args.batch_sizes else None,
        modes=tuple(args.modes) if args.modes else None,
        backends=tuple(args.backends),
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        models=dict(args.model),
        progress=not args.no_progress,
    )
    doc = run(settings)
    paths = write_outputs(doc, args.output)
    print(batch_tables(doc))
    print(f"\nreport: {paths['markdown']}  (results: {paths['json']}, {paths['csv']})")
    return 0


def merge_command(args: argparse.Namespace) -> int:
    doc = merge_documents([load_document(p) for p in args.inputs])
    paths = write_outputs(doc, args.output)
    print(batch_tables(doc))
    print(f"\nreport: {paths['markdown']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m rapiddiff.bench.cli ...` without the top-level `rapiddiff` command."""
    parser = argparse.ArgumentParser(prog="rapiddiff")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
