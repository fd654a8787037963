"""The sweep: every selected figure x backend x mode x batch size, one cell each, failures recorded in place.

Order: for each figure, each backend builds its pipeline once (only that pipeline is in memory), then runs its modes
and batch sizes. Both backends of a figure run back to back, so their ratio compares like with like.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from . import env
from .backends import Backend
from .measure import Cell, Measurement, StepCounter, free_memory, inject_fault
from .modes import MODES
from .report import make_document
from .settings import Settings
from .workloads import Figure, build_pipeline, figures_of


def run(settings: Settings) -> dict[str, Any]:
    """The whole benchmark: the results document (environment, settings, one cell per measurement)."""
    with torch_threads(settings.threads):
        environment = env.collect(settings.device, settings.dtype)
        return make_document(settings, environment, run_sweep(settings))


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_sweep(settings: Settings) -> list[Cell]:
    figures = figures_of(settings.pipelines)
    total = len(figures) * len(settings.backends) * len(settings.modes) * len(settings.batch_sizes)
    cells: list[Cell] = []
    with tqdm(total=total, unit="cell", disable=not settings.progress, dynamic_ncols=True) as bar:
        for figure in figures:
            for name in settings.backends:
                cells += _run_figure(figure, Backend(name), settings, bar)
                free_memory()
    return cells


def _run_figure(figure: Figure, backend: Backend, settings: Settings, bar: Any) -> list[Cell]:
    cells = [Cell(figure.name, b, m, backend.name) for m in settings.modes for b in settings.batch_sizes]
    for cell in cells:
        if cell.batch_size > 1 and not figure.batched:
            cell.status, cell.summary = "skipped", "batch 1 only"
    todo = [c for c in cells if c.status != "skipped"]
    bar.update(len(cells) - len(todo))
    if not todo:
        return cells
    bar.set_description(f"{figure.name}/{backend.name}: building")
    try:
        for cell in todo:
            inject_fault(settings.fault, cell.id, "build")
        pipe = build_pipeline(figure, backend, settings)
        counter = StepCounter(pipe.scheduler)
    except Exception as e:
        for cell in todo:
            cell.fail(e, "while building the pipeline")
        bar.update(len(todo))
        return cells
    for cell in todo:
        bar.set_description(cell.id)
        _run_cell(cell, pipe, counter, figure, backend, settings)
        bar.update(1)
    return cells


def _run_cell(
    cell: Cell, pipe: Any, counter: StepCounter, figure: Figure, backend: Backend, settings: Settings
) -> None:
    measurement = Measurement(cell, settings.device, settings.fault)
    inputs = figure.inputs(settings, cell.batch_size)

    def call(steps: int) -> None:
        pipe(num_inference_steps=steps, **inputs)

    try:
        undo = MODES[cell.mode](pipe, figure, backend)
        try:
            with torch.inference_mode():
                measurement.run(call, counter, settings.steps[figure.name], settings.warmup, settings.repeats)
        finally:
            undo()
    except Exception as e:
        cell.fail(e, measurement.where)
    if cell.status != "ok":
        free_memory()
