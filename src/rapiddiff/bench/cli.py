"""`rapiddiff bench`: the reference page's benchmark, rapiddiff and diffusers side by side.

rapiddiff bench                                    # GPU: the reference matrix; CPU: the `cpu` preset, minutes
rapiddiff bench --pipelines sd_txt2img if --batch-sizes 1 4 --modes compiled -o out1
rapiddiff bench merge out1/results.json out2/results.json -o report
rapiddiff bench --time-budget 300 -o out2          # the whole run in 5 minutes: fewer rounds, the least important cut
rapiddiff bench --resume -o out1                   # finish a sweep that was interrupted (Ctrl-C, SIGTERM) or cut
rapiddiff bench --overwrite -o out1                # a folder holding a run is refused without it
rapiddiff bench scale --model ./sd15 --workers 1 2 4 8    # batch generation under torchrun (docs/scale.md)

Results are written after every cell; Ctrl-C or SIGTERM stops the sweep, writes the report of the cells done and
marks the rest "interrupted". The time budget (default: the preset's) includes building and compiling; docs/bench.md.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..batch.scale import add_parser as add_scale_parser
from ..cli import add_device_argument, subcommand_parser
from .backends import BACKENDS
from .budget import BudgetSpent
from .modes import MODES
from .presets import CHECKPOINTS, PRESETS, resolve_preset
from .report import FILES, batch_tables, load_document, merge_documents, settings_from_dict, write_outputs
from .settings import EXTRA_PIPELINES, PIPELINES, Settings
from .sweep import run

DEFAULT_OUT = "bench-out"


def _model_arg(text: str) -> tuple[str, str]:
    key, sep, path = text.partition("=")
    if not sep or key not in CHECKPOINTS or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH with NAME one of {', '.join(CHECKPOINTS)}")
    return key, path


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds >= 0 (0: no budget)")
    return value


def _budgets() -> str:
    return ", ".join(f"{p.name} {p.time_budget:g} s" if p.time_budget else f"{p.name} none" for p in PRESETS.values())


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subcommand_parser(
        subparsers, "bench", "benchmark the denoising loop (iterations/s), rapiddiff vs diffusers", __doc__
    )
    parser.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                        help="auto: gpu with CUDA, else cpu; tiny: seconds, for tests")  # fmt: skip
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES + EXTRA_PIPELINES, metavar="NAME",
                        help=f"default: all of {', '.join(PIPELINES)}; also: {', '.join(EXTRA_PIPELINES)}")  # fmt: skip
    parser.add_argument("--batch-sizes", nargs="+", type=int, metavar="N", help="default: the preset's")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), metavar="MODE",
                        help=f"{', '.join(MODES)}; default: the preset's")  # fmt: skip
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, metavar="NAME",
                        help="default: rapiddiff diffusers")  # fmt: skip
    parser.add_argument("--steps", type=int, help="steps of the long call for every pipeline (default: the preset's)")
    parser.add_argument("--repeats", type=int,
                        help="timed rounds per cell (one (short, long) pair of each backend a round); alone it fixes "
                             "the count, default: the preset's adaptive range")  # fmt: skip
    parser.add_argument("--max-repeats", type=int, help="at most this many rounds while the speed-up's 95 %% interval "
                        "is wider than +-5 %%")  # fmt: skip
    parser.add_argument("--cell-seconds", type=float, help="no new round after this many seconds of timed calls")
    parser.add_argument("--warmup", type=int, help="untimed calls per cell before timing")
    add_device_argument(parser)
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: the preset's; gpu: torch's own)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: the preset's")
    parser.add_argument("--model", action="append", type=_model_arg, default=[], metavar="NAME=PATH",
                        help=f"a real Diffusers checkpoint instead of random weights; NAME: {', '.join(CHECKPOINTS)}")  # fmt: skip
    parser.add_argument("-o", "--output", default=DEFAULT_OUT, type=Path, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--time-budget", type=_seconds, metavar="SECONDS",
                        help="the whole run's seconds, building and compiling included: fewer rounds, then the least "
                             "important cells cut, when short (listed in the report; --resume runs them); 0: none. "
                             f"Default: the preset's ({_budgets()})")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --output (refused without it)")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="finish the interrupted sweep in --output with its own settings (no matrix options)")  # fmt: skip
    parser.set_defaults(func=run_command)

    sub = parser.add_subparsers(dest="bench_command", metavar="{merge,scale}")
    merge = sub.add_parser("merge", help="merge split runs' results.json into one report")
    merge.add_argument("inputs", nargs="+", type=Path, metavar="RESULTS_JSON")
    merge.add_argument("-o", "--output", required=True, type=Path, help="output folder of the merged report")
    merge.set_defaults(func=merge_command)
    add_scale_parser(sub)
    return parser


MATRIX_OPTIONS = ("preset", "pipelines", "batch_sizes", "modes", "backends", "steps", "repeats", "max_repeats",
                  "cell_seconds", "warmup", "device", "threads", "dtype", "model")  # fmt: skip
# The options that pass on to `Settings.create` as they are, under their own names.
PLAIN_OPTIONS = (
    "device",
    "dtype",
    "steps",
    "repeats",
    "max_repeats",
    "cell_seconds",
    "warmup",
    "threads",
    "time_budget",
)


def run_command(args: argparse.Namespace) -> int:
    try:
        out = check_output(args.output)
        if args.resume:
            resume, settings = _resumed(args, out)
        else:
            check_not_overwriting(out, args.overwrite)
            resume, settings = None, _settings(args)
    except (ValueError, OSError) as e:
        print(f"rapiddiff bench: error: {e}", file=sys.stderr)
        return 2
    # the alarm leaves the reserve for the report and charts
    deadline = settings.time_budget - settings.preset.estimates.reserve_s if settings.time_budget else None
    with sigterm_as_interrupt(), stop_at(deadline):
        try:
            doc = run(settings, on_cell=lambda d: write_outputs(d, out, charts=False), resume=resume)
        except BudgetSpent:  # the alarm came as the sweep was finishing: its last write holds every result
            doc = load_document(out / FILES["json"])
    paths = write_outputs(doc, out)
    print(batch_tables(doc))
    print(f"\nreport: {paths['markdown']}  (results: {paths['json']}, {paths['csv']})")
    cut = sum(c["status"] == "cut" for c in doc["cells"])
    if cut:
        print(
            f"time budget: {cut} cell(s) cut (listed in the report); `rapiddiff bench --resume -o {out}` runs them",
            file=sys.stderr,
        )
    interrupted = sum(c["status"] == "interrupted" for c in doc["cells"])
    if interrupted:
        print(
            f"interrupted: {interrupted} cell(s) not run; `rapiddiff bench --resume -o {out}` runs them",
            file=sys.stderr,
        )
        return 130
    return 0


def check_not_overwriting(out: Path, overwrite: bool) -> None:
    """A folder holding another run's results is refused (before any work) unless --overwrite says to replace it."""
    found = [name for name in FILES.values() if (out / name).exists()]
    if found and not overwrite:
        raise ValueError(
            f"-o/--output {str(out)!r} already holds a benchmark run ({', '.join(found)}); `--resume -o {out}` "
            "finishes that run with its own settings, --overwrite replaces it, or give another folder"
        )


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.create(
        resolve_preset(args.preset, torch.cuda.is_available()),
        pipelines=tuple(args.pipelines or PIPELINES),
        batch_sizes=tuple(args.batch_sizes) if args.batch_sizes else None,
        modes=tuple(args.modes) if args.modes else None,
        backends=tuple(args.backends or BACKENDS),
        models=dict(args.model),
        progress=not args.no_progress,
        **{name: getattr(args, name) for name in PLAIN_OPTIONS},
    )


def _resumed(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], Settings]:
    """The interrupted run's document and its settings (with this command's run options: progress, time budget)."""
    given = [f"--{name.replace('_', '-')}" for name in MATRIX_OPTIONS if getattr(args, name) not in (None, [], "auto")]
    if given:
        raise ValueError(f"--resume runs the interrupted sweep with its own settings; drop {' '.join(given)}")
    if args.overwrite:
        raise ValueError("--resume keeps the results in --output and --overwrite replaces them: give one of them")
    path = out / FILES["json"]
    if not path.is_file():
        raise ValueError(f"--resume: no results.json in {out} to resume")
    doc = load_document(path)
    options: dict[str, Any] = {"progress": not args.no_progress}
    if args.time_budget is not None:
        options["time_budget"] = args.time_budget
    try:
        return doc, settings_from_dict(doc["runs"][-1]["settings"], **options)
    except (KeyError, TypeError, ValueError) as e:
        detail = f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path}: its last run's settings cannot be read back ({detail})") from None


def check_output(path: Path) -> Path:
    """The output folder, made and checked writable before any work (a file there, or no permission: an error)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"-o/--output {str(path)!r} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"-o/--output {str(path)!r} cannot be written: {e.strerror or e}") from None
    return path


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) ends the sweep as Ctrl-C does: results kept, the rest "interrupted"."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        before = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def stop_at(seconds: float | None) -> Iterator[None]:
    """Raise BudgetSpent in the sweep after `seconds` (None: never), so that a cell running long (a compile on a busy
    machine) cannot carry the run past its budget; the plan keeps the cells within it otherwise."""

    def spent(signum: int, frame: Any) -> None:
        raise BudgetSpent

    if seconds is None:
        yield
        return
    try:
        before = signal.signal(signal.SIGALRM, spent)
    except (ValueError, AttributeError):  # not the main thread, or no SIGALRM (Windows): the plan alone
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def merge_command(args: argparse.Namespace) -> int:
    try:
        doc = merge_documents([load_document(p) for p in args.inputs])
    except (ValueError, OSError) as e:
        print(f"rapiddiff bench merge: error: {e}", file=sys.stderr)
        return 2
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
