"""`rapiddiff` command line: `rapiddiff generate ...`, `rapiddiff bench ...`, `rapiddiff manifest ...`, `rapiddiff serve`.

Each subcommand lives next to what it drives and registers itself through `add_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "generate": "rapiddiff.cli_generate",
    "bench": "rapiddiff.bench.cli",
    "manifest": "rapiddiff.batch.cli",
    "serve": "rapiddiff.serve.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapiddiff", description="Fast, Diffusers-compatible diffusion pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
