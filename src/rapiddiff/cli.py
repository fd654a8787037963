"""`rapiddiff` command line: `rapiddiff generate ...`, `rapiddiff bench ...`, `rapiddiff manifest ...`, `rapiddiff serve`.

Each subcommand lives next to what it drives and registers itself through `add_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

SUBCOMMANDS = {
    "generate": "rapiddiff.cli_generate",
    "bench": "rapiddiff.bench.cli",
    "manifest": "rapiddiff.batch.cli",
    "serve": "rapiddiff.serve.cli",
}


def subcommand_parser(subparsers: Any, name: str, help: str, doc: str | None) -> argparse.ArgumentParser:
    """A subcommand's parser: `doc` (its module's docstring, examples first) is its description, shown as written."""
    return subparsers.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


# Options that several subcommands take, declared once.
def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a checkpoint folder in Diffusers' layout, or a Hub id")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="default: cuda if available, else cpu")


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
