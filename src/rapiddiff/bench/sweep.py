"""The sweep: every selected figure x mode x batch size, both backends interleaved in each cell, failures recorded in
place, the results handed out after every cell.

Order: for each figure, each backend builds its pipeline once (both stay in memory), then for each mode and batch size
the two backends' cells are timed in alternation (`measure_interleaved`), so their ratio compares like with like even
on a machine whose speed drifts. After every cell `on_cell` gets the document so far (cells not run yet are
"pending"); a KeyboardInterrupt (SIGINT, or SIGTERM turned into one by the command) marks them "interrupted" and the
sweep returns what it has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from . import env
from .backends import Backend
from .measure import (
    Cell,
    Contender,
    Measurement,
    Rounds,
    StepCounter,
    free_memory,
    inject_fault,
    measure_interleaved,
)
from .modes import MODES
from .report import cells_of, make_document
from .settings import Settings
from .workloads import Figure, build_pipeline, figures_of

OnCell = Callable[[dict[str, Any]], None]


def run(settings: Settings, on_cell: OnCell | None = None, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole benchmark: the results document (environment, settings, one cell per measurement).

    resume: the document of an interrupted run; its finished groups (figure, batch, mode) are kept, not run again.
    """
    prior_runs = resume["runs"] if resume else []
    with torch_threads(settings.threads):
        environment = env.collect(settings.device, settings.dtype)
        cells = plan_cells(settings, cells_of(resume) if resume else ())
        for cell in cells:
            if not cell.done:
                cell.run = len(prior_runs)

        def report() -> None:
            if on_cell is not None:
                on_cell(make_document(settings, environment, cells, prior_runs))

        try:
            run_sweep(settings, cells, report)
        except KeyboardInterrupt:
            for cell in cells:
                if cell.status in ("pending", "running"):
                    cell.status, cell.summary, cell.it_per_s, cell.speedup = "interrupted", "interrupted", None, None
        doc = make_document(settings, environment, cells, prior_runs)
        if on_cell is not None:
            on_cell(doc)
        return doc


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def plan_cells(settings: Settings, done: Sequence[Cell] = ()) -> list[Cell]:
    """Every cell of the matrix: kept from `done` where its whole group finished, else pending (or skipped)."""
    kept = {_key(c): c for c in done if c.done}
    cells = []
    for figure in figures_of(settings.pipelines):
        for mode in settings.modes:
            for batch in settings.batch_sizes:
                group = [
                    Cell(figure.name, batch, mode, b, status="pending", summary="pending") for b in settings.backends
                ]
                if all(_key(c) in kept for c in group):
                    group = [kept[_key(c)] for c in group]
                elif batch > 1 and not figure.batched:
                    for c in group:
                        c.status, c.summary = "skipped", "batch 1 only"
                elif mode == "compiled" and batch not in (settings.compiled_batch_sizes or (batch,)):
                    for c in group:
                        c.status, c.summary = "skipped", "not compiled at this batch size (preset)"
                cells += group
    return cells


def _key(cell: Cell) -> tuple:
    return (cell.figure, cell.batch_size, cell.mode, cell.backend)


def run_sweep(settings: Settings, cells: list[Cell], report: Callable[[], None]) -> None:
    todo = [c for c in cells if c.status == "pending"]
    with tqdm(total=len(todo), unit="cell", disable=not settings.progress, dynamic_ncols=True) as bar:
        for figure in figures_of(settings.pipelines):
            mine = [c for c in todo if c.figure == figure.name]
            if mine:
                _run_figure(figure, mine, settings, bar, report)
                free_memory()


def _run_figure(figure: Figure, cells: list[Cell], settings: Settings, bar: Any, report: Callable[[], None]) -> None:
    pipes: dict[str, tuple[Any, StepCounter]] = {}
    for name in settings.backends:
        mine = [c for c in cells if c.backend == name]
        bar.set_description(f"{figure.name}/{name}: building")
        try:
            for cell in mine:
                inject_fault(settings.fault, cell.id, "build")
            pipe = build_pipeline(figure, Backend(name), settings)
            pipes[name] = (pipe, StepCounter(pipe.scheduler))
        except Exception as e:
            for cell in mine:
                cell.fail(e, "while building the pipeline")
    for mode in settings.modes:
        for batch in settings.batch_sizes:
            group = [c for c in cells if c.mode == mode and c.batch_size == batch]
            if not group:
                continue
            bar.set_description(f"{figure.name}/{batch}/{mode}")
            _run_group(group, pipes, figure, settings)
            bar.update(len(group))
            report()
    pipes.clear()


def _run_group(
    group: list[Cell], pipes: dict[str, tuple[Any, StepCounter]], figure: Figure, settings: Settings
) -> None:
    """One cell per backend at one (figure, batch, mode), timed interleaved."""
    inputs = figure.inputs(settings, group[0].batch_size)
    contenders, undos = [], []
    for cell in group:
        if cell.backend not in pipes:  # its build failed: already recorded
            continue
        cell.status = "running"
        pipe, counter = pipes[cell.backend]
        contender = Contender(Measurement(cell, settings.device, settings.fault), _caller(pipe, inputs), counter)
        try:
            undos.append(MODES[cell.mode](pipe, figure, Backend(cell.backend)))
        except Exception as e:
            cell.fail(e, contender.measurement.where)
            continue
        contenders.append(contender)
    try:
        if contenders:
            rounds = Rounds(settings.repeats, settings.max_repeats, settings.cell_seconds, settings.target)
            with torch.inference_mode():
                measure_interleaved(contenders, settings.steps[figure.name], settings.warmup, rounds)
    finally:
        for undo in undos:
            undo()
    if any(c.status != "ok" for c in group):
        free_memory()


def _caller(pipe: Any, inputs: dict[str, Any]) -> Callable[[int], None]:
    def call(steps: int) -> None:
        pipe(num_inference_steps=steps, **inputs)

    return call
