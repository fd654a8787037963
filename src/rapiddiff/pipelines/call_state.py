"""The state of one pipeline call, as a value.

A call's settings (guidance scale, clip skip, the LoRA scale in `cross_attention_kwargs`, its own copy of the
scheduler...) live in a frozen `CallState`, never on the pipeline, so one pipeline serves many threads. Diffusers'
properties (`pipe.guidance_scale`, `pipe.num_timesteps`, `pipe.interrupt`, `pipe.do_classifier_free_guidance`, and
`pipe.scheduler` inside a call) read the state of the call running in the current context (thread or task); after a
call they read the last one finished in that context. A step-end callback's writes (`pipe._guidance_scale = 0.0`,
`pipe._interrupt = True`) replace the current state with a changed copy (`update`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import types
import weakref
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, NamedTuple


@dataclasses.dataclass(frozen=True)
class CallState:
    """One call's state: its settings, its own copy of the configured scheduler (`scheduler`; None once the call
    is over), its progress (`num_timesteps`, `interrupt`) and its result check (`non_finite_images`)."""

    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    clip_skip: int | None = None
    cross_attention_kwargs: Mapping[str, Any] | None = None
    # SDXL's share of the schedule (Diffusers' `pipe.denoising_start` / `pipe.denoising_end`)
    denoising_start: float | None = None
    denoising_end: float | None = None
    num_timesteps: int | None = None
    interrupt: bool = False
    scheduler: Any = None
    # after the loop: per image, whether its final latents held nan/inf
    non_finite_images: list[bool] | None = None

    @property
    def do_classifier_free_guidance(self) -> bool:
        """guidance_scale <= 1 runs the model on the conditional batch only (a callback may lower it mid-run)."""
        return self.guidance_scale > 1

    @property
    def lora_scale(self) -> float | None:
        """The LoRA scale asked for by `cross_attention_kwargs["scale"]` (None: not given)."""
        return (self.cross_attention_kwargs or {}).get("scale")


def call_scheduler(configured: Any) -> Any:
    """The scheduler a call steps: a copy of the configured one (cheap: its config and tables), so that calls never
    share its position in the schedule or its history. A scheduler with methods patched on the instance (e.g.
    `scheduler.step = counting_wrapper`, bound to the configured object) is used as is: a copy would run the wrapper
    on the original; such calls are serialized on it instead (`shares_scheduler`)."""
    patched = any(
        isinstance(v, (types.FunctionType, types.MethodType, functools.partial)) for v in vars(configured).values()
    )
    return configured if patched else copy.deepcopy(configured)


class _Entry(NamedTuple):
    pipe: weakref.ref
    state: CallState
    running: bool


# id(pipeline) -> its current (or last) call in this context. Copied on write: a context's value is never mutated.
_CALLS: ContextVar[Mapping[int, _Entry]] = ContextVar("rapiddiff_calls", default=MappingProxyType({}))
DEFAULT = CallState()


def _entry(pipe: Any) -> _Entry | None:
    entry = _CALLS.get().get(id(pipe))
    return entry if entry is not None and entry.pipe() is pipe else None


def _put(pipe: Any, entry: _Entry | None) -> None:
    calls = {k: v for k, v in _CALLS.get().items() if v.pipe() is not None and k != id(pipe)}
    if entry is not None:
        calls[id(pipe)] = entry
    _CALLS.set(calls)


def current(pipe: Any) -> CallState | None:
    """The state of `pipe`'s call running in this context, None outside a call."""
    entry = _entry(pipe)
    return entry.state if entry is not None and entry.running else None


def latest(pipe: Any) -> CallState:
    """The running call's state, else the last finished one in this context, else the defaults."""
    entry = _entry(pipe)
    return entry.state if entry is not None else DEFAULT


def update(pipe: Any, what: str, **changes: Any) -> CallState:
    """Replace the running call's state by a copy with `changes` (a callback lowering the guidance scale)."""
    state = current(pipe)
    if state is None:
        raise AttributeError(f"{what} is the state of a running call; set it from a step-end callback")
    state = dataclasses.replace(state, **changes)
    _put(pipe, _Entry(weakref.ref(pipe), state, True))
    return state


@contextlib.contextmanager
def running(pipe: Any, state: CallState) -> Iterator[None]:
    """`state` is `pipe`'s current call inside the block; afterwards it is the last call (in this context only).
    A nested call of the same pipeline (from a callback) restores the outer call's state when it returns."""
    outer = _entry(pipe)
    _put(pipe, _Entry(weakref.ref(pipe), state, True))
    try:
        yield
    finally:
        finished = current(pipe) or state
        if outer is not None and outer.running:
            _put(pipe, outer)
        else:
            _put(pipe, _Entry(weakref.ref(pipe), dataclasses.replace(finished, scheduler=None), False))
