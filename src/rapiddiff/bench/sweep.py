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
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from . import env
from .backends import Backend
from .budget import (
    MIN_INTERVAL_ROUNDS,
    BudgetSpent,
    Calibration,
    Clock,
    Group,
    Limits,
    Plan,
    format_seconds,
    group_key,
    plan,
)
from .measure import (
    Cell,
    Contender,
    Measurement,
    Rounds,
    StepCounter,
    free_memory,
    measure_interleaved,
    short_steps,
)
from .modes import CACHED_FIGURES, GRAPHS_PER_CELL, MODES, compile_recipes, is_compiled_mode
from .report import cells_of, make_document
from .settings import Settings
from .workloads import FIGURES, Figure, build_pipeline, figures_of

OnCell = Callable[[dict[str, Any]], None]


def run(
    settings: Settings,
    on_cell: OnCell | None = None,
    resume: dict[str, Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """The whole benchmark: the results document (environment, settings, one cell per measurement).

    resume: the document of an interrupted run; its finished groups (figure, batch, mode) are kept, not run again.
    clock: monotonic seconds, for the time budget (the tests pass a fake one).
    """
    prior_runs = resume["runs"] if resume else []
    with torch_threads(settings.threads):
        elapsed = Clock(clock)
        environment = env.collect(settings.device, settings.dtype)
        cells = plan_cells(settings, cells_of(resume) if resume else ())
        for cell in cells:
            if not cell.done:
                cell.run = len(prior_runs)
        budget = Budget(settings, cells, elapsed)
        compiled = (
            {"compiled": compile_recipes(settings.backends)} if any(map(is_compiled_mode, settings.modes)) else {}
        )

        def document() -> dict[str, Any]:
            return make_document(settings, environment, cells, prior_runs, {"budget": budget.record(), **compiled})

        def report() -> None:
            if on_cell is not None:
                on_cell(document())

        try:
            run_sweep(settings, budget, report)
        except BudgetSpent:
            budget.stop()
        except KeyboardInterrupt:
            for cell in cells:
                if cell.status in ("pending", "running"):
                    cell.status, cell.summary, cell.it_per_s, cell.speedup = "interrupted", "interrupted", None, None
        doc = document()
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
                elif is_compiled_mode(mode) and batch not in (settings.compiled_batch_sizes or (batch,)):
                    for c in group:
                        c.status, c.summary = "skipped", "not compiled at this batch size (preset)"
                elif mode == "cached" and figure.name not in CACHED_FIGURES:
                    for c in group:
                        c.status, c.summary = "skipped", f"cached mode: {', '.join(CACHED_FIGURES)} only"
                cells += group
    return cells


def _key(cell: Cell) -> tuple:
    return (cell.figure, cell.batch_size, cell.mode, cell.backend)


class Budget:
    """The time budget of one sweep: the groups still to run, re-planned (`budget.plan`) before each figure's build and
    each group, with the preset's estimates scaled by what was measured so far."""

    def __init__(self, settings: Settings, cells: list[Cell], clock: Clock) -> None:
        self.settings, self.clock, self.cells = settings, clock, cells
        self.calibration = Calibration()
        self.limits = Limits(
            low=min(settings.repeats, MIN_INTERVAL_ROUNDS),
            high=settings.max_repeats,
            repeats=settings.repeats,
            cell_seconds=settings.cell_seconds,
        )
        # (figure, batch, mode) -> its cells still to run, in the order the sweep runs them
        self.left: dict[tuple[str, int, str], list[Cell]] = {}
        for figure in figures_of(settings.pipelines):
            for mode in settings.modes:
                for batch in settings.batch_sizes:
                    group = [c for c in cells if (c.figure, c.batch_size, c.mode) == (figure.name, batch, mode)]
                    if any(c.status == "pending" for c in group):
                        self.left[(figure.name, batch, mode)] = group
        self.built: str | None = None  # the figure whose pipelines are built
        self.rounds = self.limits.high  # of the latest plan
        self.fewest_rounds = self.limits.high  # the lowest cap a group ran with
        self.cuts: dict[str, str] = {}  # group key -> why it was cut

    @property
    def seconds(self) -> float | None:
        return self.settings.time_budget or None

    def costs(self, figure: str, batch: int, mode: str) -> tuple[float, float, float]:
        """Unscaled estimates for one group: (warm-up without compiling, compiling, one round), all backends."""
        settings, e = self.settings, self.settings.preset.estimates
        calls = short_steps(settings.steps[figure]) + settings.steps[figure]
        preset_calls = short_steps(settings.preset.steps[figure]) + settings.preset.steps[figure]
        pair = e.pair_s[figure] * calls / preset_calls * (1 + e.batch_slope * (batch - 1))
        backends = len(settings.backends)
        graphs = GRAPHS_PER_CELL.get(mode, 0)
        compile_s = (backends if graphs == "backends" else graphs) * e.compile_s[figure]
        return backends * settings.warmup * pair / 2, compile_s, backends * pair

    def group(self, figure: str, batch: int, mode: str) -> Group:
        warm, compile_s, round_s = self.costs(figure, batch, mode)
        run, compiling = self.calibration.factor("run"), self.calibration.factor("compile")
        rank = [f.name for f in FIGURES].index(figure)
        return Group(figure, batch, mode, warm * run + compile_s * compiling, round_s * run, rank)

    def replan(self) -> Plan:
        """Plan the groups left; mark the cut ones "cut" (and ones planned back in "pending")."""
        groups = [self.group(*key) for key in self.left]
        build_s = self.settings.preset.estimates.build_s * len(self.settings.backends)
        builds = {g.figure: build_s * self.calibration.factor("build") for g in groups if g.figure != self.built}
        elapsed = self.clock.elapsed()
        limits, reserve = self.limits, self.settings.preset.estimates.reserve_s
        p = plan(groups, budget_s=self.seconds, elapsed_s=elapsed, limits=limits, builds=builds, reserve_s=reserve)
        self.rounds = p.rounds
        for key, cells in self.left.items():
            name = group_key(*key)
            for cell in cells:
                if name in p.cut and cell.status == "pending":
                    cell.status, cell.summary = "cut", "cut: time budget"
                elif name not in p.cut and cell.status == "cut":
                    cell.status, cell.summary = "pending", "pending"
            if name in p.cut:
                self.cuts[name] = (
                    f"time budget {self.seconds:g} s: {p.left_s:.0f} s left after {elapsed:.0f} s, not enough for "
                    f"every cell left even at {limits.low} round(s) a cell; cut least important first"
                    if p.left_s > 0
                    else f"time budget {self.seconds:g} s: spent after {elapsed:.0f} s"
                )
            else:
                self.cuts.pop(name, None)
        return p

    def stop(self) -> None:
        """The budget ran out during a cell (`BudgetSpent`): that cell and every one not run yet are cut."""
        elapsed = self.clock.elapsed()
        for cell in self.cells:
            if cell.status in ("pending", "running"):
                key = group_key(cell.figure, cell.batch_size, cell.mode)
                self.cuts[key] = (
                    f"time budget {self.seconds:g} s: stopped while it ran, after {elapsed:.0f} s"
                    if cell.status == "running"
                    else self.cuts.get(key, f"time budget {self.seconds:g} s: spent after {elapsed:.0f} s")
                )
                cell.status, cell.summary, cell.it_per_s, cell.speedup = "cut", "cut: time budget", None, None

    def keeps(self, figure: str) -> bool:
        return any(key[0] == figure and group_key(*key) not in self.cuts for key in self.left)

    def take(self, key: tuple[str, int, str]) -> list[Cell]:
        """The group's cells to run now, at most `rounds` rounds (none when cut); it leaves the plan."""
        group = [c for c in self.left.pop(key) if c.status == "pending"]
        if group:
            self.fewest_rounds = min(self.fewest_rounds, self.rounds)
        return group

    def record_build(self, seconds: float) -> None:
        self.calibration.record("build", self.settings.preset.estimates.build_s * len(self.settings.backends), seconds)

    def record_group(self, cells: list[Cell], seconds: float) -> None:
        warm, compile_s, round_s = self.costs(cells[0].figure, cells[0].batch_size, cells[0].mode)
        compiled = sum(c.first_call_s or 0.0 for c in cells) if compile_s else 0.0
        rounds = max((len(c.seconds) for c in cells), default=0)
        self.calibration.record("compile", compile_s, compiled)
        self.calibration.record("run", warm + rounds * round_s, seconds - compiled)

    def postfix(self) -> str:
        elapsed = self.clock.elapsed()
        if self.seconds is None:
            return f"{format_seconds(elapsed)} elapsed"
        return f"{format_seconds(self.seconds - elapsed)} left of {format_seconds(self.seconds)}"

    def record(self) -> dict[str, Any]:
        """For the run's entry in the document: the budget, the time used, the rounds, what was cut and why."""
        return {
            "seconds": self.seconds,
            "elapsed_s": round(self.clock.elapsed(), 1),
            "rounds": self.fewest_rounds,
            "max_rounds": self.limits.high,
            "cut": dict(self.cuts),
        }


def run_sweep(settings: Settings, budget: Budget, report: Callable[[], None]) -> None:
    total = sum(len(cells) for cells in budget.left.values())
    with tqdm(total=total, unit="cell", disable=not settings.progress, dynamic_ncols=True) as bar:
        for figure in figures_of(settings.pipelines):
            if any(key[0] == figure.name for key in budget.left):
                _run_figure(figure, settings, budget, bar, report)
                free_memory()


def _run_figure(figure: Figure, settings: Settings, budget: Budget, bar: Any, report: Callable[[], None]) -> None:
    budget.replan()
    bar.set_postfix_str(budget.postfix())
    keys = [key for key in budget.left if key[0] == figure.name]
    if not budget.keeps(figure.name):  # every group cut: not even built
        bar.set_description(f"{figure.name}: cut (time budget)")
        for key in keys:
            bar.update(len(budget.take(key)))
        report()
        return
    pipes: dict[str, tuple[Any, StepCounter]] = {}
    cells = [c for key in keys for c in budget.left[key]]
    start = budget.clock.elapsed()
    for name in settings.backends:
        mine = [c for c in cells if c.backend == name]
        bar.set_description(f"{figure.name}/{name}: building")
        try:
            pipe = build_pipeline(figure, Backend(name), settings)
            pipes[name] = (pipe, StepCounter(pipe.scheduler))
        except Exception as e:
            for cell in mine:
                cell.fail(e, "while building the pipeline")
    budget.record_build(budget.clock.elapsed() - start)
    budget.built = figure.name
    for key in keys:
        budget.replan()
        bar.set_postfix_str(budget.postfix())
        size = len(budget.left[key])
        group = budget.take(key)
        bar.set_description(group_key(*key) + ("" if group else ": cut (time budget)"))
        if group:
            start = budget.clock.elapsed()
            _run_group(group, pipes, figure, settings, budget.rounds)
            budget.record_group(group, budget.clock.elapsed() - start)
        bar.update(size)
        bar.set_postfix_str(budget.postfix())
        report()
    pipes.clear()


def _run_group(
    group: list[Cell], pipes: dict[str, tuple[Any, StepCounter]], figure: Figure, settings: Settings, cap: int
) -> None:
    """One cell per backend at one (figure, batch, mode), timed interleaved, at most `cap` rounds (the budget's)."""
    inputs = figure.inputs(settings, group[0].batch_size)
    contenders, undos = [], []
    for cell in group:
        if cell.backend not in pipes:  # its build failed: already recorded
            continue
        cell.status = "running"
        pipe, counter = pipes[cell.backend]
        contender = Contender(Measurement(cell, settings.device), _caller(pipe, inputs), counter)
        try:
            undos.append(MODES[cell.mode](pipe, figure, Backend(cell.backend)))
        except Exception as e:
            cell.fail(e, contender.measurement.where)
            continue
        contenders.append(contender)
    try:
        if contenders:
            rounds = Rounds(min(settings.repeats, cap), cap, settings.cell_seconds, settings.target)
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
