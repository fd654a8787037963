"""The time budget (`--time-budget`): which cells fit, and how many rounds each gets.

`plan` is a pure function of the groups still to run (each with its estimated costs), the budget and the time spent so
far. The sweep calls it before the first cell and again before every group, with estimates corrected by what the
groups done so far really took (`Calibration`), so a machine slower than the estimates loses rounds and then cells,
and a faster one gets them back.

When the groups left do not fit:
1. fewer rounds per cell, down to `Limits.low` (2 where the settings ask for an interval: one round gives none);
2. then whole groups are cut, least important first (`cut_order`): the largest batch size first; within a batch size
   eager-vanilla, then cached, then compiled, then eager-sdpa; within those the last figure of the report first. A pipeline none
   of whose groups is kept is not built. Cut cells are listed in the report with the reason; `--resume` runs them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

# the report's modes from most to least important when time is short
MODE_IMPORTANCE = ("eager-sdpa", "compiled", "compiled-bf16", "cached", "eager-vanilla")
MIN_INTERVAL_ROUNDS = 2  # a 95 % interval needs two paired rounds


@dataclasses.dataclass(frozen=True)
class Group:
    """One (figure, batch size, mode) still to run: all its backends' cells, timed together, with estimated costs."""

    figure: str
    batch_size: int
    mode: str
    setup_s: float  # the warm-up calls of every backend, compiles included
    round_s: float  # one round: a (short, long) pair of every backend
    figure_rank: int = 0  # the figure's place in the report (0 first)

    @property
    def key(self) -> str:
        return group_key(self.figure, self.batch_size, self.mode)


def group_key(figure: str, batch_size: int, mode: str) -> str:
    """`figure/batch/mode`, as the report and results.json name a group."""
    return f"{figure}/{batch_size}/{mode}"


@dataclasses.dataclass(frozen=True)
class Limits:
    """Rounds per cell: at least `low` (the budget never goes below it), at most `high`; `repeats` rounds run before
    `cell_seconds` of timed calls may stop a cell (as `measure.Rounds`)."""

    low: int
    high: int
    repeats: int
    cell_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"rounds low={self.low}, high={self.high}: need 1 <= low <= high")

    def rounds_run(self, cap: int, round_s: float) -> int:
        """At most how many rounds a cell capped at `cap` runs (cell_seconds stops it after the round that passes it)."""
        repeats = min(self.repeats, cap)
        by_time = math.floor(self.cell_seconds / round_s) + 1 if round_s > 0 else cap
        return min(cap, max(repeats, by_time))


@dataclasses.dataclass(frozen=True)
class Plan:
    rounds: int  # rounds per cell at most
    keep: tuple[str, ...]  # group keys to run, in the order given
    cut: tuple[str, ...]  # group keys cut, least important first
    needed_s: float  # estimated seconds for what is kept, the reserve included
    left_s: float  # seconds left in the budget when planned (inf without one)

    def reason(self, budget_s: float, elapsed_s: float) -> str:
        return (
            f"time budget {budget_s:g} s: {self.left_s:.0f} s left after {elapsed_s:.0f} s, not enough for every cell "
            f"at {self.rounds} round(s); the least important were cut"
        )


def cut_order(groups: Sequence[Group]) -> list[Group]:
    """The groups least important first: largest batch, then mode (eager-vanilla, cached, compiled, eager-sdpa), then the
    figures from the last."""

    def importance(g: Group) -> tuple:
        mode = MODE_IMPORTANCE.index(g.mode) if g.mode in MODE_IMPORTANCE else len(MODE_IMPORTANCE)
        return (g.batch_size, mode, g.figure_rank)

    return sorted(groups, key=importance, reverse=True)


def needed(
    groups: Sequence[Group], builds: Mapping[str, float], limits: Limits, rounds: int, reserve_s: float
) -> float:
    """Estimated seconds to run `groups` at `rounds` per cell: each figure's build (once), set-ups, rounds, reserve."""
    figures = {g.figure for g in groups}
    total = reserve_s + sum(builds.get(f, 0.0) for f in figures)
    return total + sum(g.setup_s + limits.rounds_run(rounds, g.round_s) * g.round_s for g in groups)


def plan(
    groups: Sequence[Group],
    *,
    budget_s: float | None,
    elapsed_s: float,
    limits: Limits,
    builds: Mapping[str, float] | None = None,
    reserve_s: float = 0.0,
) -> Plan:
    """Rounds per cell and the groups kept so that the estimated time fits in `budget_s - elapsed_s`.

    builds: figure -> seconds to build its pipelines, for figures not built yet. reserve_s: the end of the run (the
    report and charts). Without a budget everything is kept at `limits.high` rounds.
    """
    builds = builds or {}
    left = math.inf if budget_s is None else budget_s - elapsed_s

    def cost(kept: Sequence[Group], rounds: int) -> float:
        return needed(kept, builds, limits, rounds, reserve_s)

    def most_rounds(kept: Sequence[Group]) -> int | None:
        return next((r for r in range(limits.high, limits.low - 1, -1) if cost(kept, r) <= left), None)

    kept, cut = list(groups), []
    rounds = most_rounds(kept)
    order = iter(cut_order(groups))
    while rounds is None and kept:
        victim = next(order)
        kept.remove(victim)
        cut.append(victim)
        rounds = most_rounds(kept) if kept else limits.low
    rounds = rounds or limits.low
    return Plan(rounds, tuple(g.key for g in kept), tuple(g.key for g in cut), cost(kept, rounds), left)


class Calibration:
    """Estimated against measured seconds by kind ("build", "compile", "run"): later estimates are scaled by the ratio
    so far (1 before any measurement; at least `floor`, so one warm compile cache does not make later cold compiles
    look free)."""

    def __init__(self, floor: float = 0.5) -> None:
        self.floor = floor
        self._sums: dict[str, list[float]] = {}

    def record(self, kind: str, estimated_s: float, measured_s: float) -> None:
        if estimated_s > 0:
            sums = self._sums.setdefault(kind, [0.0, 0.0])
            sums[0] += estimated_s
            sums[1] += max(measured_s, 0.0)

    def factor(self, kind: str) -> float:
        """This kind's ratio; before its first measurement, the ratio over all kinds (a machine slower at running
        the models is slower at compiling them too); 1 before any."""
        estimated, measured = self._sums.get(kind, (0.0, 0.0))
        if estimated <= 0:
            estimated, measured = (sum(x) for x in zip((0.0, 0.0), *self._sums.values()))
        return max(self.floor, measured / estimated) if estimated > 0 else 1.0


class BudgetSpent(BaseException):
    """Raised (by `rapiddiff bench`'s alarm) when the budget runs out in the middle of a cell: the sweep stops there and
    the cells not finished are cut. A BaseException, so that a cell's failure handling does not record it as its own."""


class Clock:
    """Seconds since the run started, from an injected monotonic clock (a fake one in the tests)."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.start = now()

    def elapsed(self) -> float:
        return self.now() - self.start


def format_seconds(seconds: float) -> str:
    """`9:05`; `-0:12` once past the budget."""
    sign = "-" if seconds < 0 else ""
    whole = int(round(abs(seconds)))
    return f"{sign}{whole // 60}:{whole % 60:02d}"
