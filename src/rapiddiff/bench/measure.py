"""Measuring one cell: iterations/s of the denoising loop, seconds per image, peak memory, first-call (compile) time.

Method: a short call (s steps) and a long call (S steps, the pipeline's default) are timed end to end with the device
synchronised before and after; the loop iterations each really ran (n, N) are counted at `scheduler.step`. Fixed
costs (text encoding, VAE decoding, image conversion) are the same in both calls, so

    iterations/s = (N - n) / (T_long - T_short)

is the loop alone, with no synchronisation inside it. The first `warmup` calls are not timed (the first one's time is
reported: it includes compilation); `repeats` (short, long) pairs follow, and the medians of T_short and T_long give
the reported rate (the raw times are kept, to show the spread).

A failure is recorded in its cell with where it happened ("OOM after warm-up (timed call 2 of 6)", "compile error in
warm-up") and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .backends import Unavailable


@dataclasses.dataclass
class Cell:
    """One (figure, batch size, mode, backend) measurement; the JSON and CSV rows are these fields."""

    figure: str
    batch_size: int
    mode: str
    backend: str
    status: str = "ok"  # ok | failed | unavailable (the backend lacks a class) | skipped (IF II/III at batch > 1)
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

    @property
    def id(self) -> str:
        return f"{self.figure}/{self.batch_size}/{self.mode}/{self.backend}"

    def fail(self, error: BaseException, where: str) -> None:
        self.status, self.summary, self.error = describe_failure(error, where)


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


def inject_fault(spec: str | None, cell_id: str, phase: str) -> None:
    """Raise an out-of-memory error where `spec` ("CELL@PHASE,...", fnmatch patterns) names this cell and phase."""
    for entry in (spec or "").split(","):
        pattern, _, phase_pattern = entry.strip().partition("@")
        if pattern and fnmatch.fnmatchcase(cell_id, pattern) and fnmatch.fnmatchcase(phase, phase_pattern or "*"):
            raise torch.cuda.OutOfMemoryError(f"injected for {cell_id} at {phase} (fault spec {spec!r})")


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

    def __init__(self, cell: Cell, device: torch.device, fault: str | None) -> None:
        self.cell, self.device, self.fault = cell, device, fault
        self.where = "while applying the mode"

    def enter(self, phase: str, where: str) -> None:
        self.where = where
        inject_fault(self.fault, self.cell.id, phase)

    def run(self, call: Callable[[int], Any], counter: StepCounter, long_steps: int, warmup: int, repeats: int) -> None:
        cell, device = self.cell, self.device
        short = short_steps(long_steps)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(warmup):
            self.enter("warm-up", "in warm-up")
            seconds = timed(call, short, device)
            if i == 0:
                cell.first_call_s = seconds
        pairs = []  # [(iterations, seconds) of the short call, of the long call] per repeat
        for r in range(repeats):
            pair = []
            for k, steps in enumerate((short, long_steps), start=2 * r + 1):
                self.enter(f"timed:{k}", f"after warm-up (timed call {k} of {2 * repeats})")
                counter.count = 0
                seconds = timed(call, steps, device)
                if counter.count == 0:
                    raise RuntimeError(
                        "the pipeline never called scheduler.step: its loop iterations cannot be counted"
                    )
                pair.append((counter.count, seconds))
            pairs.append(pair)
        self.where = "while computing the result"
        _summarise(cell, pairs)
        if device.type == "cuda":
            cell.peak_mem_gb = torch.cuda.max_memory_allocated(device) / 2**30


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
