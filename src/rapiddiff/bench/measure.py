"""Measuring one cell: iterations/s of the denoising loop, seconds per image, peak memory, first-call (compile) time.

Method: a short call (s steps) and a long call (S steps, the pipeline's default) are timed end to end with the device
synchronised before and after; the loop iterations each really ran (n, N) are counted at `scheduler.step`. Fixed
costs (text encoding, VAE decoding, image conversion) are the same in both calls, so

    iterations/s = (N - n) / (T_long - T_short)

is the loop alone, with no synchronisation inside it. The first `warmup` calls are not timed (the first one's time is
reported: it includes compilation); timed (short, long) pairs follow, and the medians of T_short and T_long give the
reported rate (the raw times are kept, to show the spread).

Both backends of a cell run interleaved (`measure_interleaved`): one (short, long) pair of each per round, the order
alternating (A B, B A, ...) so that a machine getting slower or faster weighs on both alike. Each round gives one
paired ratio of the two backends' rates; the speed-up is their geometric mean with a 95 % Student-t interval, and the
rounds go on until that interval is within +-`target` of the estimate (at least `repeats`, at most `max_repeats`
rounds, or until `seconds` of timed calls have passed).

A failure is recorded in its cell with where it happened ("OOM after warm-up (timed call 2 of 6)", "compile error in
warm-up") and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .backends import Unavailable

NOT_DONE = ("pending", "running", "interrupted", "cut")  # the statuses a resumed sweep runs


@dataclasses.dataclass
class Cell:
    """One (figure, batch size, mode, backend) measurement; the JSON and CSV rows are these fields."""

    figure: str
    batch_size: int
    mode: str
    backend: str
    # ok | failed | unavailable (the backend lacks a class) | skipped (IF II/III at batch > 1) | pending (not run yet) |
    # running | interrupted (the sweep was stopped before it finished) | cut (by the time budget); `rapiddiff bench
    # --resume` runs the interrupted and cut ones
    status: str = "ok"
    it_per_s: float | None = None  # from the median short and long times
    seconds: list[list[float]] = dataclasses.field(default_factory=list)  # [short, long] call times per repeat
    s_per_image: float | None = None  # median long call / batch size: end to end, fixed costs included
    fixed_s: float | None = None  # long call minus its loop: text encoding, VAE decoding, ...
    first_call_s: float | None = None  # the first (short) call: includes torch.compile
    peak_mem_gb: float | None = None  # peak allocated device memory (CUDA only), weights included
    iterations: list[int] = dataclasses.field(default_factory=list)  # loop iterations run: [short, long]
    summary: str = ""  # what the report's table shows when status is not ok
    error: str | None = None  # the full message
    run: int = 0  # index into the document's runs (several after a merge)
    # rapiddiff cells measured next to diffusers: [estimate, low, high] of rapiddiff / diffusers, 95 % interval over
    # the paired rounds (low = high = estimate after one round)
    speedup: list[float] | None = None

    @property
    def id(self) -> str:
        return f"{self.figure}/{self.batch_size}/{self.mode}/{self.backend}"

    def fail(self, error: BaseException, where: str) -> None:
        self.status, self.summary, self.error = describe_failure(error, where)
        self.it_per_s = self.speedup = None

    @property
    def done(self) -> bool:
        """Measured, failed or skipped: a resumed sweep does not run it again."""
        return self.status not in NOT_DONE


class StepCounter:
    """Counts the denoising loop's iterations: every pipeline calls `scheduler.step` once per iteration."""

    def __init__(self, scheduler: Any) -> None:
        self.count = 0
        step = scheduler.step

        @functools.wraps(step)  # keeps the signature: pipelines inspect it for `eta` and `generator`
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return step(*args, **kwargs)

        scheduler.step = counted


def short_steps(long_steps: int) -> int:
    return max(2, long_steps // 10)


# --- failures ----------------------------------------------------------------------------------------------------
def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def describe_failure(error: BaseException, where: str) -> tuple[str, str, str]:
    """(status, short summary for the table, full message)."""
    message = f"{type(error).__name__}: {error}".strip()[:2000]
    if isinstance(error, Unavailable):
        return "unavailable", error.summary, message
    if is_out_of_memory(error):
        return "failed", f"OOM {where}", message
    if type(error).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return "failed", f"compile error {where}", message
    return "failed", f"{type(error).__name__} {where}", message


def free_memory() -> None:
    """After a failure or a finished pipeline: drop what it held, device memory and compiled graphs included."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


# --- timing ------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[int], Any], steps: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call(steps)
    synchronize(device)
    return time.perf_counter() - start


class Measurement:
    """Times one cell; `where` says which phase it is in, for the failure message."""

    def __init__(self, cell: Cell, device: torch.device) -> None:
        self.cell, self.device = cell, device
        self.where = "while applying the mode"
        self.pairs: list[list[tuple[int, float]]] = []  # [(iterations, seconds) short, long] per timed round

    def enter(self, where: str) -> None:
        self.where = where

    def warm_up(self, call: Callable[[int], Any], short: int, warmup: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for i in range(warmup):
            self.enter("in warm-up")
            seconds = timed(call, short, self.device)
            if i == 0:
                self.cell.first_call_s = seconds

    def time_pair(self, call: Callable[[int], Any], counter: StepCounter, short: int, long: int) -> None:
        """One timed (short, long) pair."""
        pair = []
        for k, steps in enumerate((short, long), start=2 * len(self.pairs) + 1):
            self.enter(f"after warm-up (timed call {k})")
            counter.count = 0
            seconds = timed(call, steps, self.device)
            if counter.count == 0:
                raise RuntimeError("the pipeline never called scheduler.step: its loop iterations cannot be counted")
            pair.append((counter.count, seconds))
        self.pairs.append(pair)

    def finish(self) -> None:
        self.where = "while computing the result"
        _summarise(self.cell, self.pairs)
        if self.device.type == "cuda":
            self.cell.peak_mem_gb = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.cell.status = "ok"


@dataclasses.dataclass
class Contender:
    """One backend's side of an interleaved cell: its measurement, the call it times and its step counter."""

    measurement: Measurement
    call: Callable[[int], Any]
    counter: StepCounter

    @property
    def cell(self) -> Cell:
        return self.measurement.cell

    @property
    def alive(self) -> bool:
        return self.cell.status == "running"

    def attempt(self, action: Callable[[], None]) -> None:
        """Run `action`; a failure lands in this cell (the other backend goes on)."""
        try:
            action()
        except Exception as e:
            self.cell.fail(e, self.measurement.where)


@dataclasses.dataclass(frozen=True)
class Rounds:
    """How long an interleaved cell is timed."""

    repeats: int  # at least this many rounds
    max_repeats: int  # at most this many
    seconds: float  # stop after this many seconds of timed calls (once `repeats` rounds are done)
    target: float = 0.05  # stop once the speed-up's 95 % interval is within +-target of the estimate


def measure_interleaved(contenders: list[Contender], long_steps: int, warmup: int, rounds: Rounds) -> None:
    """Time one cell of each backend in alternation (see the module docstring); fills the cells."""
    short = short_steps(long_steps)
    for c in contenders:
        c.attempt(lambda c=c: c.measurement.warm_up(c.call, short, warmup))
    start, n = time.perf_counter(), 0
    while n < rounds.max_repeats:
        alive = [c for c in contenders if c.alive]
        if not alive:
            return
        for c in alive if n % 2 == 0 else alive[::-1]:
            c.attempt(lambda c=c: c.measurement.time_pair(c.call, c.counter, short, long_steps))
        n += 1
        if n >= rounds.repeats and (time.perf_counter() - start > rounds.seconds or _converged(contenders, rounds)):
            break
    for c in contenders:
        if c.alive:
            c.attempt(c.measurement.finish)
    by_backend = {c.cell.backend: c for c in contenders if c.cell.status == "ok"}
    if {"rapiddiff", "diffusers"} <= by_backend.keys():
        rapid, base = by_backend["rapiddiff"], by_backend["diffusers"]
        rapid.cell.speedup = paired_speedup(rapid.measurement.pairs, base.measurement.pairs)


def _converged(contenders: list[Contender], rounds: Rounds) -> bool:
    if len(contenders) != 2 or not all(c.alive for c in contenders):
        return True  # one backend (or none left to compare): its own `repeats` rounds are enough
    estimate = paired_speedup(contenders[0].measurement.pairs, contenders[1].measurement.pairs)
    if estimate is None or len(contenders[0].measurement.pairs) < 2:
        return False
    value, low, high = estimate
    return high / value - 1 <= rounds.target and 1 - low / value <= rounds.target


def pair_rate(pair: list[tuple[int, float]]) -> float | None:
    """One round's own iterations/s; None when the long call was not slower than the short one (noise)."""
    (n_short, t_short), (n_long, t_long) = pair
    if n_long <= n_short or t_long <= t_short:
        return None
    return (n_long - n_short) / (t_long - t_short)


# two-sided 95 % quantiles of Student's t by degrees of freedom (beyond the table: the normal's)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000}  # fmt: skip


def t95(df: int) -> float:
    return next((v for k, v in sorted(_T95.items()) if df <= k), 1.96)


def paired_speedup(
    pairs_a: list[list[tuple[int, float]]], pairs_b: list[list[tuple[int, float]]]
) -> list[float] | None:
    """[estimate, low, high] of rate_a / rate_b over rounds timed back to back: the geometric mean of the per-round
    ratios and its 95 % Student-t interval (on the log scale). None without one usable round."""
    logs = []
    for a, b in zip(pairs_a, pairs_b):
        ra, rb = pair_rate(a), pair_rate(b)
        if ra is not None and rb is not None:
            logs.append(math.log(ra / rb))
    if not logs:
        return None
    mean = statistics.fmean(logs)
    half = t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else 0.0
    return [math.exp(mean), math.exp(mean - half), math.exp(mean + half)]


def _summarise(cell: Cell, pairs: list[list[tuple[int, float]]]) -> None:
    """it/s from the median short and long times, robust to one slowed call of each kind."""
    (n_short, _), (n_long, _) = pairs[0]  # the loop lengths do not change between repeats
    t_short = statistics.median(ts for (_, ts), _ in pairs)
    t_long = statistics.median(tl for _, (_, tl) in pairs)
    if n_long <= n_short or t_long <= t_short:
        raise RuntimeError(f"the long calls were not slower than the short ones: {pairs}; use more steps or repeats")
    cell.it_per_s = (n_long - n_short) / (t_long - t_short)
    cell.seconds = [[ts, tl] for (_, ts), (_, tl) in pairs]
    cell.iterations = [n_short, n_long]
    cell.s_per_image = t_long / cell.batch_size
    cell.fixed_s = t_long - n_long / cell.it_per_s
