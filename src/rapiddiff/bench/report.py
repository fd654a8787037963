"""Results: the JSON document, its CSV rows, the Markdown report laid out like the reference page's tables, and PNG charts.

A document is {"format", "runs": [{"env", "settings"}], "cells": [...]}; each cell names its run. Split runs merge by
concatenating runs and cells (a later run's cell replaces an earlier one of the same key), and the report is drawn from
the cells alone in a fixed order, so a merged report reads exactly like one run's.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .backends import BACKENDS
from .budget import group_key
from .env import COMPARABLE_KEYS
from .measure import Cell, short_steps
from .modes import MODES
from .settings import Settings
from .workloads import FIGURES, FIGURES_BY_NAME

FORMAT = "rapiddiff-bench/1"
CELL_FIELDS = tuple(f.name for f in dataclasses.fields(Cell))
ENV_COLUMNS = ("device_name", "dtype", "torch", "rapiddiff", "diffusers", "git_revision")
FILES = {"json": "results.json", "csv": "results.csv", "markdown": "report.md"}
# what a run's entry must hold to be resumed and reported (later keys have defaults for older files)
ENV_KEYS = ("device", "device_name", "dtype", "torch", "rapiddiff", "diffusers", "transformers", "cpu", "cpu_count",
            "torch_threads", "git_revision", "started")  # fmt: skip
SETTINGS_KEYS = ("preset", "device", "dtype", "sizes", "steps", "repeats", "warmup", "threads", "pipelines",
                 "batch_sizes", "modes", "backends", "models")  # fmt: skip


# --- the document ------------------------------------------------------------------------------------------------
def settings_dict(settings: Settings) -> dict[str, Any]:
    p = settings.preset
    return {
        "preset": p.name,
        "device": str(settings.device),
        "dtype": str(settings.dtype).removeprefix("torch."),
        "sizes": {"sd": p.sd_size, "if_stage_1": p.if_sizes[0], "if_stage_2": p.if_sizes[1], "sdxl": p.sdxl_size},
        "steps": {f: {"long": n, "short": short_steps(n)} for f, n in settings.steps.items()},
        "repeats": settings.repeats,
        "max_repeats": settings.max_repeats,
        "cell_seconds": settings.cell_seconds,
        "target": settings.target,
        "compiled_batch_sizes": settings.compiled_batch_sizes and list(settings.compiled_batch_sizes),
        "warmup": settings.warmup,
        "threads": settings.threads,
        "pipelines": list(settings.pipelines),
        "batch_sizes": list(settings.batch_sizes),
        "modes": list(settings.modes),
        "backends": list(settings.backends),
        "models": {k: str(v) for k, v in settings.models.items()},
        "time_budget": settings.time_budget,
    }


def make_document(
    settings: Settings,
    env: dict[str, Any],
    cells: Iterable[Cell],
    prior_runs: Sequence[dict[str, Any]] = (),
    record: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The document of this run, after `prior_runs` (those of an interrupted run it resumes). `record`: more of the
    run's entry: "budget" (`sweep.Budget.record`: seconds, time used, fewest rounds planned, cut groups and why) and
    "compiled" (`modes.compile_recipes`: what the compiled column ran)."""
    rows = [dataclasses.asdict(c) for c in cells]
    runs = [*prior_runs, {"env": env, "settings": settings_dict(settings), **(record or {})}]
    return {"format": FORMAT, "runs": runs, "cells": _ordered(rows)}


def settings_from_dict(s: dict[str, Any], **extra: Any) -> Settings:
    """The Settings a document's run was made with (`--resume`); `extra`: progress, time_budget."""
    from .presets import PRESETS
    from .settings import DTYPES

    if s.get("preset") not in PRESETS:
        raise ValueError(f"the results name preset {s.get('preset')!r}, which this version does not have")
    return Settings(
        preset=PRESETS[s["preset"]],
        device=torch.device(s["device"]),
        dtype=DTYPES[s["dtype"]],
        pipelines=tuple(s["pipelines"]),
        batch_sizes=tuple(s["batch_sizes"]),
        modes=tuple(s["modes"]),
        backends=tuple(s["backends"]),
        steps={f: v["long"] for f, v in s["steps"].items()},
        repeats=s["repeats"],
        warmup=s["warmup"],
        threads=s["threads"],
        models={k: Path(v) for k, v in s["models"].items()},
        max_repeats=s.get("max_repeats"),
        cell_seconds=s.get("cell_seconds", 0.0),
        target=s.get("target", 0.05),
        compiled_batch_sizes=tuple(s["compiled_batch_sizes"]) if s.get("compiled_batch_sizes") else None,
        **{"time_budget": s.get("time_budget", 0.0), **extra},
    )


def cells_of(doc: dict[str, Any]) -> list[Cell]:
    return [Cell(**{k: v for k, v in c.items() if k in CELL_FIELDS}) for c in doc["cells"]]


def load_document(path: str | Path) -> dict[str, Any]:
    """A results.json, checked whole; ValueError naming the file and what is wrong with it."""
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}: line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file ({e.reason} at byte {e.start})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a rapiddiff bench result (expected format {FORMAT!r})")
    problem = _document_problem(doc)
    if problem:
        raise ValueError(f"{path} is damaged: {problem}")
    return doc


def _document_problem(doc: dict[str, Any]) -> str | None:
    runs, cells = doc.get("runs"), doc.get("cells")
    if not isinstance(runs, list) or not runs:
        return "'runs' is not a non-empty list"
    for i, run in enumerate(runs):
        if not (isinstance(run, dict) and isinstance(run.get("env"), dict) and isinstance(run.get("settings"), dict)):
            return f"runs[{i}] lacks its 'env' or 'settings'"
        for part, keys in (("env", ENV_KEYS), ("settings", SETTINGS_KEYS)):
            missing = [k for k in keys if k not in run[part]]
            if missing:
                return f"runs[{i}]['{part}'] lacks {', '.join(missing)}"
    if not isinstance(cells, list):
        return "'cells' is not a list"
    for i, cell in enumerate(cells):
        missing = [f for f in CELL_FIELDS if f not in cell] if isinstance(cell, dict) else ["all fields"]
        if missing:
            return f"cells[{i}] lacks {', '.join(missing)}"
        if not (isinstance(cell["run"], int) and 0 <= cell["run"] < len(runs)):
            return f"cells[{i}] names run {cell['run']!r}; the file has {len(runs)} run(s)"
    return None


def merge_documents(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One document from split runs; a cell measured twice keeps the later run's result."""
    runs: list[dict[str, Any]] = []
    cells: dict[tuple, dict[str, Any]] = {}
    for doc in docs:
        for cell in doc["cells"]:
            cell = {**cell, "run": cell["run"] + len(runs)}
            cells[_key(cell)] = cell
        runs += doc["runs"]
    return {"format": FORMAT, "runs": runs, "cells": _ordered(list(cells.values()))}


def _key(cell: dict[str, Any]) -> tuple:
    return (cell["figure"], cell["batch_size"], cell["mode"], cell["backend"])


def _group(cell: dict[str, Any]) -> str:
    return group_key(cell["figure"], cell["batch_size"], cell["mode"])


def _rank(order: Sequence[str], name: str) -> int:
    return order.index(name) if name in order else len(order)


def _ordered(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's fixed order: the reference page's figures, batch size, mode, backend."""
    figures = [f.name for f in FIGURES]

    def order(c: dict[str, Any]) -> tuple:
        return (
            _rank(figures, c["figure"]),
            c["batch_size"],
            _rank(list(MODES), c["mode"]),
            _rank(BACKENDS, c["backend"]),
        )

    return sorted(cells, key=order)


def _axis(cells: list[dict[str, Any]], field: str) -> list:
    return list(dict.fromkeys(c[field] for c in cells))  # cells are ordered, so this is too


# --- text --------------------------------------------------------------------------------------------------------
def _label(figure: str) -> str:
    return FIGURES_BY_NAME[figure].label if figure in FIGURES_BY_NAME else figure


def _value(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    return f"{cell['it_per_s']:.2f}" if cell["status"] == "ok" else cell["summary"]


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if a and b and a["status"] == b["status"] == "ok":
        return a["it_per_s"] / b["it_per_s"]
    return None


def speedup_interval(rapid: dict[str, Any] | None, base: dict[str, Any] | None) -> list[float] | None:
    """[estimate, low, high] of rapiddiff / diffusers: the paired rounds' interval when the cell has one (interleaved
    runs), else the ratio of the two cells' rates (low = high = estimate: no interval)."""
    if rapid and base and rapid["status"] == base["status"] == "ok":
        if rapid.get("speedup"):
            return list(rapid["speedup"])
        ratio = _ratio(rapid, base)
        return None if ratio is None else [ratio, ratio, ratio]
    return None


def format_speedup(interval: list[float] | None) -> str:
    """`1.31x (1.25–1.38)`; an interval holding 1.00 reads as the same speed: `same (1.02x, 0.97–1.07)`."""
    if interval is None:
        return "–"
    value, low, high = interval
    if low == high:
        return f"{value:.2f}x"
    if low <= 1.0 <= high:
        return f"same ({value:.2f}x, {low:.2f}–{high:.2f})"
    return f"{value:.2f}x ({low:.2f}–{high:.2f})"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def batch_tables(doc: dict[str, Any]) -> str:
    """Per batch size: rows = figures, columns = modes x backends, plus rapiddiff/diffusers per mode (it/s)."""
    cells = doc["cells"]
    by_key = {_key(c): c for c in cells}
    modes, backends = _axis(cells, "mode"), _axis(cells, "backend")
    both = {"rapiddiff", "diffusers"} <= set(backends)
    header = ["Pipeline"]
    for mode in modes:
        header += [f"{mode}: {b}" for b in backends] + (["speed-up"] if both else [])
    parts = []
    for batch in sorted(_axis(cells, "batch_size")):
        rows = []
        for figure in _axis(cells, "figure"):
            row = [_label(figure)]
            for mode in modes:
                found = {b: by_key.get((figure, batch, mode, b)) for b in backends}
                row += [_value(found[b]) for b in backends]
                if both:
                    row.append(format_speedup(speedup_interval(found["rapiddiff"], found["diffusers"])))
            rows.append(row)
        parts.append(f"### Batch size {batch} (iterations/s)\n\n" + _table(header, rows))
    return "\n\n".join(parts)


def _rate(cell: dict[str, Any], t_short: float, t_long: float) -> float | None:
    """One repeat's own iterations/s (None when noise made its long call no slower than its short one)."""
    n_short, n_long = cell["iterations"]
    return (n_long - n_short) / (t_long - t_short) if t_long > t_short else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _details(doc: dict[str, Any]) -> str:
    header = ["figure", "batch", "mode", "backend", "it/s", "runs", "s/image", "fixed s", "first call s", "peak GiB",
              "iterations"]  # fmt: skip
    rows = [
        [c["figure"], str(c["batch_size"]), c["mode"], c["backend"], _value(c),
         " ".join(_fmt(_rate(c, ts, tl)) or "n/a" for ts, tl in c["seconds"]), _fmt(c["s_per_image"], 3),
         _fmt(c["fixed_s"], 3), _fmt(c["first_call_s"]), _fmt(c["peak_mem_gb"]), "/".join(map(str, c["iterations"]))]
        for c in doc["cells"]
        if c["status"] != "skipped"
    ]  # fmt: skip
    return _table(header, rows)


def _environment(doc: dict[str, Any]) -> list[str]:
    runs = doc["runs"]
    lines = []
    for i, run in enumerate(runs):
        env, s = run["env"], run["settings"]
        name = f"Run {i + 1}: " if len(runs) > 1 else ""
        lines.append(
            f"- {name}**{env['device_name']}** ({env['device']}), {env['dtype']}, torch {env['torch']}, "
            f"rapiddiff {env['rapiddiff']} (git {env['git_revision']}), diffusers {env['diffusers']}, "
            f"transformers {env['transformers']}, CPU {env['cpu']} x {env['cpu_count']} (torch threads: "
            f"{env['torch_threads']}), {env['started']}"
        )
        sizes, steps = s["sizes"], {f: v["long"] for f, v in s["steps"].items()}
        lines.append(
            f"  preset `{s['preset']}`: SD {sizes['sd']}x{sizes['sd']}, IF {sizes['if_stage_1']} -> "
            f"{sizes['if_stage_2']} (x4 upscaler on the stage-I image), steps {_steps_text(steps)}, "
            f"{s['warmup']} warm-up call(s), {_repeats_text(s)}"
            + (f", checkpoints {s['models']}" if s["models"] else ", random weights")
        )
        if run.get("budget") and run["budget"]["seconds"]:
            lines.append(f"  {_budget_text(run['budget'])}")
        if run.get("compiled"):
            lines.append(f"  {_compiled_text(run['compiled'])}")
    facts = [{**{k: r["env"].get(k) for k in COMPARABLE_KEYS}, "preset": r["settings"]["preset"]} for r in runs]
    differing = [k for k in facts[0] if len({str(f[k]) for f in facts}) > 1]
    if differing:
        lines.append(f"- **Warning**: the merged runs differ in {', '.join(differing)}: compare across them with care.")
    return lines


def _repeats_text(s: dict[str, Any]) -> str:
    most = s.get("max_repeats") or s["repeats"]
    if most == s["repeats"]:
        return f"median of {most} repeat(s)"
    return (f"backends interleaved, {s['repeats']} to {most} rounds a cell (until the speed-up's 95 % interval is "
            f"within ±{100 * s.get('target', 0.05):.0f} % or {s.get('cell_seconds', 0):g} s of timed calls)")  # fmt: skip


def _budget_text(b: dict[str, Any]) -> str:
    rounds = b["rounds"] if b["rounds"] < b["max_rounds"] else None
    return (
        f"time budget {b['seconds']:g} s (`--time-budget`): the sweep took {b['elapsed_s']:.0f} s"
        + (f"; rounds per cell lowered to as few as {rounds} (of {b['max_rounds']}) to fit" if rounds else "")
        + (f"; {len(b['cut'])} group(s) cut to fit" if b["cut"] else "")
    )


def _compiled_text(c: dict[str, Any]) -> str:
    """The compiled column's recipe per backend and the inductor options in force, as recorded at run time."""

    def options(values: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v}" for k, v in values.items())

    sides = []
    for name, recipe in c["backends"].items():
        call = recipe["call"]
        if "compile_pipeline" in call:
            call += f" with its defaults ({options(recipe['arguments'])})"
        mode = f"; mode {recipe['arguments'].get('mode')} adds {options(recipe['mode_options'])}"
        sides.append(f"{name}: `{call}`" + (mode if recipe["mode_options"] else ""))
    return f"compiled column: {'; '.join(sides)}; inductor's global config: {options(c['inductor_config'])}"


def _steps_text(steps: dict[str, int]) -> str:
    values = set(steps.values())
    return str(values.pop()) if len(values) == 1 else ", ".join(f"{f} {n}" for f, n in steps.items())


def render_markdown(doc: dict[str, Any], charts: Sequence[str] = (), chart_note: str | None = None) -> str:
    failures = [c for c in doc["cells"] if c["status"] in ("failed", "unavailable")]
    parts = [
        "# rapiddiff bench",
        "\n".join(_environment(doc)),
        "Iterations/s of the denoising loop (higher is better), text encoding and VAE decoding excluded: "
        "(N - n) / (T_long - T_short) over a long and a short call. *speed-up* is rapiddiff / diffusers in the same "
        "mode: the geometric mean of the ratios of rounds timed back to back, with its 95 % interval; *same* when "
        "that interval holds 1.00. IF stages II and III run at batch 1 only, as on the reference page.",
        "## Iterations per second",
        batch_tables(doc),
    ]
    if charts or chart_note:
        parts += ["## Charts", "\n\n".join(f"![{Path(c).stem}]({c})" for c in charts) or chart_note]
    parts += ["## Details", "*runs*: each repeat's own iterations/s. *s/image*: the long call end to end, per image. "
              "*fixed s*: its time outside the loop. *first call s*: the first warm-up call (includes compilation). "
              "*iterations*: short/long loop lengths.",
              _details(doc)]  # fmt: skip
    reasons = {key: why for r in doc["runs"] for key, why in (r.get("budget") or {}).get("cut", {}).items()}
    cut = {_group(c): reasons.get(_group(c), "cut") for c in doc["cells"] if c["status"] == "cut"}
    if cut:
        parts += ["## Cut by the time budget",
                  "Least important first: the largest batch size, then eager-vanilla, compiled, eager-sdpa, then the "
                  "last pipelines. `rapiddiff bench --resume -o FOLDER` runs them (`--time-budget` to give it more "
                  "time) and keeps the rest.",
                  "\n".join(f"- `{key}`: {why}" for key, why in cut.items())]  # fmt: skip
    unfinished = [c for c in doc["cells"] if c["status"] in ("pending", "running", "interrupted")]
    if unfinished:
        parts += ["## Not run", f"{len(unfinished)} cell(s) did not run (the sweep was interrupted or is still "
                                f"running); `rapiddiff bench --resume -o FOLDER` runs them and keeps the rest."]  # fmt: skip
    if failures:
        parts += ["## Failures", "\n".join(f"- `{c['figure']}/{c['batch_size']}/{c['mode']}/{c['backend']}`: "
                                           f"{c['summary']}: {c['error']}" for c in failures)]  # fmt: skip
    return "\n\n".join(parts) + "\n"


# --- files -------------------------------------------------------------------------------------------------------
def write_csv(doc: dict[str, Any], path: Path) -> None:
    columns = [f for f in CELL_FIELDS if f != "iterations"] + ["iterations_short", "iterations_long", "preset"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, *ENV_COLUMNS])
        writer.writeheader()
        for c in doc["cells"]:
            run = doc["runs"][c["run"]]
            iterations = c["iterations"] or [None, None]
            row = {k: v for k, v in c.items() if k != "iterations"}
            row["seconds"] = ";".join(f"{ts:.6f}/{tl:.6f}" for ts, tl in c["seconds"])
            row |= {"iterations_short": iterations[0], "iterations_long": iterations[1]}
            row |= {"preset": run["settings"]["preset"], **{k: run["env"].get(k) for k in ENV_COLUMNS}}
            writer.writerow(row)


def _interval(num: dict[str, Any] | None, den: dict[str, Any] | None) -> list[float] | None:
    if num and den and num["backend"] == "rapiddiff" and den["backend"] == "diffusers" and num["mode"] == den["mode"]:
        return speedup_interval(num, den)
    ratio = _ratio(num, den)
    return None if ratio is None else [ratio, ratio, ratio]


def chart_specs(doc: dict[str, Any]) -> list[tuple[str, str, tuple[str, str], tuple[str, str]]]:
    """(file name, title, numerator (mode, backend), denominator (mode, backend)) of each speed-up chart."""
    cells = doc["cells"]
    modes, backends = _axis(cells, "mode"), _axis(cells, "backend")
    specs = []
    if {"rapiddiff", "diffusers"} <= set(backends):
        for mode in modes:
            specs.append((f"speedup_rapiddiff_vs_diffusers_{mode}.png", f"rapiddiff / diffusers, {mode}",
                          (mode, "rapiddiff"), (mode, "diffusers")))  # fmt: skip
    if "eager-sdpa" in modes:
        for mode in (m for m in modes if m != "eager-sdpa"):
            for backend in backends:
                specs.append((f"speedup_{mode}_vs_eager-sdpa_{backend}.png", f"{backend}: {mode} / eager-sdpa",
                              (mode, backend), ("eager-sdpa", backend)))  # fmt: skip
    return specs


def write_charts(doc: dict[str, Any], out_dir: Path) -> tuple[list[str], str | None]:
    """Speed-up bar charts (figures x batch sizes), as the reference page's; (file names, note when skipped)."""
    specs = chart_specs(doc)
    if not specs:
        return [], None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "Charts skipped: matplotlib is not installed (`pip install 'rapiddiff[bench]'`)."
    by_key = {_key(c): c for c in doc["cells"]}
    figures, batches = _axis(doc["cells"], "figure"), sorted(_axis(doc["cells"], "batch_size"))
    width = 0.8 / len(batches)
    written = []
    for filename, title, (num_mode, num_backend), (den_mode, den_backend) in specs:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(figures)), 4.0))
        for i, batch in enumerate(batches):
            intervals = [
                _interval(by_key.get((f, batch, num_mode, num_backend)), by_key.get((f, batch, den_mode, den_backend)))
                for f in figures
            ]
            xs = [j + (i - (len(batches) - 1) / 2) * width for j in range(len(figures))]
            values = [math.nan if r is None else r[0] for r in intervals]
            errors = [[0.0 if r is None else r[0] - r[1] for r in intervals],
                      [0.0 if r is None else r[2] - r[0] for r in intervals]]  # fmt: skip
            ax.bar(xs, values, width, yerr=errors, capsize=3, label=f"batch {batch}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(figures)), [_label(f) for f in figures], rotation=20, ha="right")
        ax.set_ylabel("speed-up (iterations/s ratio)")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=100)
        plt.close(fig)
        written.append(filename)
    return written, None


def write_outputs(doc: dict[str, Any], out_dir: str | Path, charts: bool = True) -> dict[str, Path]:
    """results.json, results.csv, the charts and report.md in `out_dir`; returns the paths by kind.

    Each file is written beside its final name and renamed over it, so a reader (or a crash) never meets half a file.
    charts=False (the writes after each cell) leaves the charts for the end.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in FILES.items()}
    with _replacing(paths["json"]) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
    with _replacing(paths["csv"]) as tmp:
        write_csv(doc, tmp)
    written, note = write_charts(doc, out) if charts else ([], None)
    with _replacing(paths["markdown"]) as tmp:
        tmp.write_text(render_markdown(doc, written, note))
    return paths | {Path(c).stem: out / c for c in written}


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed over it when the block succeeds (removed when it fails)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
