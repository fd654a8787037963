"""Dynamic batching: one worker thread owns the pipeline; queued requests with equal `BatchKey`s run as one call.

The pipeline is never called concurrently: request handlers only queue `Job`s and wait. The worker takes the oldest
job, adds later jobs with the same key (in arrival order) until the batch holds `max_batch_size` images or
`batch_wait_ms` has passed since it took the first, and runs them as one call with one generator per image. The
pipelines draw each image's initial noise (and a stochastic scheduler's step noise) from that image's own generator,
so an image depends on its prompt and seed only, not on what it was batched with. With `pad_to_compiled`, a batch is
padded with dummy images (discarded) to the next compiled size, so a compiled pipeline sees few distinct shapes.

Says no: a full queue (429), a draining server (503), an expired request (504: skipped if not started). An out-of-memory
call is split in two and each half retried once; images that still do not fit fail with 503. Any other error fails
that batch's requests (500), never the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import rapiddiff

from .schemas import BatchKey, ImageSpec, RequestError

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, DROPPED = "queued", "running", "done", "dropped"


@dataclass(frozen=True)
class ServeSettings:
    """How requests are grouped and bounded (the `rapiddiff serve` options)."""

    max_batch_size: int = 4
    batch_wait_ms: float = 10.0
    max_queue: int = 64  # images queued (not started); more is a 429
    request_timeout: float = 300.0  # seconds from arrival to the answer; later is a 504
    pad_to_compiled: bool = False  # pad each call to a power of two (or max_batch_size): few shapes to compile

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("batch_wait_ms", "request_timeout"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "request_timeout" and value == 0):
                raise ValueError(f"{name} must be a finite number > 0 (>= 0 for batch_wait_ms), got {value!r}")

    def padded_size(self, images: int) -> int:
        """The call's batch size for `images` images: itself, or with padding the next compiled size."""
        if not self.pad_to_compiled:
            return images
        return min(1 << (images - 1).bit_length(), self.max_batch_size)


@dataclass(eq=False)
class Job:
    """One request's work. The worker answers through `done`, a callback that is safe to call from its thread."""

    spec: ImageSpec
    deadline: float  # time.monotonic()
    done: Callable[[list[Any] | None, RequestError | None], None]
    state: str = QUEUED
    images: list[Any] = field(init=False)  # image k at index k, filled by the worker

    def __post_init__(self) -> None:
        self.images = [None] * self.n

    @property
    def n(self) -> int:
        return len(self.spec.seeds)


class Slot:
    """One image of a batch: a job's image k, or padding (job None)."""

    def __init__(self, job: Job | None, k: int = 0):
        self.job, self.k = job, k

    @property
    def prompt(self) -> str:
        return self.job.spec.prompt if self.job else ""

    @property
    def negative_prompt(self) -> str | None:
        return self.job.spec.negative_prompt if self.job else None

    @property
    def seed(self) -> int:
        return self.job.spec.seeds[self.k] if self.job else 0


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


class Batcher:
    """The queue and its worker thread. `submit` / `cancel` are called from request handlers (any thread)."""

    def __init__(self, pipe: Any, settings: ServeSettings, metrics: Any):
        self.pipe, self.settings, self.metrics = pipe, settings, metrics
        self._pipes: dict[str | None, Any] = {None: pipe}  # one view of the pipeline per scheduler (worker only)
        self._shapes: set[tuple[int, ...]] = set()  # call shapes seen: with pad_to_compiled, a new one compiles
        self._queue: list[Job] = []
        self._running = 0  # jobs in the call now running
        self._lock = threading.Condition()
        self._draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batch_seconds = 1.0  # moving average of a call's duration (for Retry-After)

    # --- the handlers' side -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="rapiddiff-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._draining and not self._stopping

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def queued_images(self) -> int:
        with self._lock:
            return sum(job.n for job in self._queue)

    def submit(self, spec: ImageSpec, timeout: float, done: Callable[..., None]) -> Job:
        """Queue a request's work, or refuse it: 503 while draining, 429 when the queue is full."""
        job = Job(spec, time.monotonic() + timeout, done)
        with self._lock:
            if self._draining or self._stopping:
                raise RequestError(503, "the server is shutting down; retry on another replica", reason="draining")
            queued = sum(j.n for j in self._queue)
            if queued + job.n > self.settings.max_queue:
                calls = math.ceil((queued + self.settings.max_batch_size) / self.settings.max_batch_size)
                raise RequestError(
                    429,
                    f"the queue is full ({queued} image(s) waiting, --max-queue {self.settings.max_queue}); retry later",
                    reason="queue_full",
                    retry_after=max(1, math.ceil(calls * self.batch_seconds)),
                )
            self._queue.append(job)
            self._lock.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not started (True); a running job finishes and its result is discarded (False)."""
        with self._lock:
            if job.state != QUEUED:
                return False
            job.state = DROPPED
            self._queue.remove(job)
            self._lock.notify_all()
            return True

    def drain(self) -> None:
        """Stop taking work; what was accepted still runs."""
        with self._lock:
            self._draining = True
            self._lock.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running; False if `timeout` passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._queue and not self._running, timeout)

    # --- the worker -------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self._lock:
                    self._running = 0
                    self._lock.notify_all()

    def _next_batch(self) -> list[Job] | None:
        """The next batch (oldest job first, then same-key jobs within the wait); None when stopping."""
        with self._lock:
            while True:
                self._lock.wait_for(lambda: self._queue or self._stopping)
                if self._stopping and not self._queue:
                    return None
                self._expire()
                if self._queue:
                    break
            first = self._queue[0]
            start = time.monotonic()
            while True:
                batch = self._take_matching(first.spec.key)
                size = sum(job.n for job in batch)
                remaining = start + self.settings.batch_wait_ms / 1000 - time.monotonic()
                if size >= self.settings.max_batch_size or remaining <= 0 or self._stopping:
                    break
                self._lock.wait(remaining)
                self._expire()
                if first.state != QUEUED:  # dropped while we waited: start over with the new oldest
                    if not self._queue:
                        return []
                    first = self._queue[0]
            for job in batch:
                self._queue.remove(job)
                job.state = RUNNING
            self._running = len(batch)
            return batch

    def _take_matching(self, key: BatchKey) -> list[Job]:
        batch, size = [], 0
        for job in self._queue:
            if job.spec.key == key and size + job.n <= self.settings.max_batch_size:
                batch.append(job)
                size += job.n
        return batch

    def _expire(self) -> None:
        """Answer queued jobs past their deadline with 504 without running them."""
        now = time.monotonic()
        for job in [j for j in self._queue if j.deadline <= now]:
            self._queue.remove(job)
            job.state = DROPPED
            job.done(None, timeout_error(self.settings.request_timeout))

    def _run(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        self.metrics.batch_size.observe(sum(job.n for job in jobs))
        slots = [Slot(job, k) for job in jobs for k in range(job.n)]
        failed = self._call_splitting_on_oom(jobs[0].spec.key, slots)
        for job in jobs:
            if job in failed:
                job.done(None, failed[job])
            else:
                self.metrics.images_generated.inc(job.n)
                job.done(job.images, None)
            job.state = DONE

    def _call_splitting_on_oom(self, key: BatchKey, slots: list[Slot]) -> dict[Job, RequestError]:
        """Run the slots; on out-of-memory, each half once more. Returns the jobs that failed and why."""
        error = self._try_call(key, slots)
        if error is None:
            return {}
        if error.reason != "out_of_memory" or len(slots) == 1:
            return dict.fromkeys(_jobs(slots), error)
        half = (len(slots) + 1) // 2
        logger.warning("out of memory on %d image(s): retrying as %d + %d", len(slots), half, len(slots) - half)
        failed: dict[Job, RequestError] = {}
        for part in (slots[:half], slots[half:]):
            error = self._try_call(key, part)
            if error is not None:
                failed |= dict.fromkeys(_jobs(part), error)
        return failed

    def _try_call(self, key: BatchKey, slots: list[Slot]) -> RequestError | None:
        """`_call`, with its error as the answer to its requests: 503 for out-of-memory, else 500."""
        try:
            self._call(key, slots)
            return None
        except Exception as error:  # noqa: BLE001 - an error fails these requests, never the worker
            if is_out_of_memory(error):
                _free_memory(self.pipe)
                return RequestError(503, f"out of memory generating {len(slots)} image(s) at {key.width}x"
                                    f"{key.height}; retry later or ask for fewer or smaller images",
                                    reason="out_of_memory")  # fmt: skip
            logger.exception("pipeline call failed (%d image(s))", len(slots))
            return RequestError(500, f"generation failed: {type(error).__name__}: {error}", reason="error")

    def _call(self, key: BatchKey, slots: list[Slot]) -> None:
        """One pipeline call for the slots (padded to a compiled size); fills each job's images."""
        size = self.settings.padded_size(len(slots))
        batch = slots + [Slot(None)] * (size - len(slots))
        shape = (size, key.height, key.width, key.guidance_scale > 1)
        if self.settings.pad_to_compiled and shape not in self._shapes:
            logger.warning("compiling for a new shape: batch %d, %dx%d, guidance %s (this call takes longer)",
                           size, key.width, key.height, "on" if shape[3] else "off")  # fmt: skip
            self.metrics.compiled_shapes.inc()
        self._shapes.add(shape)
        negatives = [slot.negative_prompt for slot in batch]
        start = time.perf_counter()
        images = self._pipe_for(key.scheduler)(
            prompt=[slot.prompt for slot in batch],
            negative_prompt=None if all(n is None for n in negatives) else [n or "" for n in negatives],
            height=key.height,
            width=key.width,
            num_inference_steps=key.steps,
            guidance_scale=key.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(slot.seed) for slot in batch],
            output_type="pil",
        ).images
        elapsed = time.perf_counter() - start
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * elapsed
        self.metrics.batch_seconds.observe(elapsed)
        for slot, image in zip(slots, images):  # the padding's images are dropped here
            slot.job.images[slot.k] = image

    def _pipe_for(self, scheduler: str | None) -> Any:
        """The pipeline with `scheduler` (a class name): a view sharing every model, made once per scheduler, so the
        loaded pipeline's own scheduler is never replaced."""
        if scheduler not in self._pipes:
            fresh = getattr(rapiddiff, scheduler).from_config(self.pipe.scheduler.config)
            view = type(self.pipe).from_pipe(self.pipe, scheduler=fresh)
            view.set_progress_bar_config(**getattr(self.pipe, "_progress_bar_config", {}))  # from_pipe drops it
            self._pipes[scheduler] = view
        return self._pipes[scheduler]


def _jobs(slots: list[Slot]) -> list[Job]:
    return list(dict.fromkeys(slot.job for slot in slots if slot.job is not None))


def _free_memory(pipe: Any) -> None:
    device = getattr(pipe, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.empty_cache()


def timeout_error(timeout: float) -> RequestError:
    return RequestError(504, f"the request did not finish within --request-timeout {timeout:g} s", reason="timeout")


def answer_in_loop(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> Callable[..., None]:
    """A `Job.done` callback that resolves an asyncio future of `loop` from the worker thread (once)."""

    def resolve(images: list[Any] | None, error: RequestError | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(images)

    def done(images: list[Any] | None, error: RequestError | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped, nobody waits for this
            loop.call_soon_threadsafe(resolve, images, error)

    return done
