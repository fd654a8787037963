"""Sharing models between concurrent pipeline calls.

One pipeline (or several built on the same components) may serve many threads. Models are shared, never copied, so
what a call changes on a model must be scoped to that call, and what changes a model for good must not happen while
calls read it:

- `in_use(models)`: a call registers the models it runs for its duration. `check_idle(model, what)` refuses (with a
  RuntimeError naming `what`) to change a model that calls are running: loading or deleting LoRA adapters, changing
  their weights, fusing, compiling.
- `serialized(keys)`: calls that set per-call values on a shared object (a LoRA call scale is a buffer value of the
  UNet) or run code that is not safe to enter from two threads at once (compiled models with CUDA graphs, offload
  hooks moving models between devices) take one lock per such object; such calls run one at a time, in any order.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

_registry_lock = threading.Lock()
_calls: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_locks: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def in_use(models: Iterable[Any]) -> Iterator[None]:
    """Mark `models` as read by a running call for the block's duration (objects that cannot be weakly referenced
    or hashed, which nothing could change under a call through this module anyway, are skipped)."""
    models = [getattr(m, "_orig_mod", m) for m in models]  # under a torch.compile wrapper: the model changed
    models = [m for m in {id(m): m for m in models}.values() if _trackable(m)]
    with _registry_lock:
        for model in models:
            _calls[model] = _calls.get(model, 0) + 1
    try:
        yield
    finally:
        with _registry_lock:
            for model in models:
                _calls[model] -= 1


def _trackable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
        hash(obj)
    except TypeError:
        return False
    return True


def calls_running(model: Any) -> int:
    if not _trackable(model):
        return 0
    with _registry_lock:
        return _calls.get(model, 0)


def check_idle(model: Any, what: str) -> None:
    """Raise if a pipeline call is running `model`: `what` would change it under that call."""
    running = calls_running(getattr(model, "_orig_mod", model))
    if running:
        raise RuntimeError(
            f"{what}: {type(model).__name__} is in use by {running} running pipeline call(s); changing it now would "
            f"change those calls' results. Call {what} before serving, or once the calls have returned."
        )


def call_lock(key: Any) -> threading.RLock:
    """The lock that serializes calls on `key` (reentrant: a callback may call the pipeline again)."""
    with _registry_lock:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = threading.RLock()
        return lock


@contextlib.contextmanager
def serialized(keys: Iterable[Any]) -> Iterator[None]:
    """Hold the call lock of every key (in one global order, so two calls never wait on each other)."""
    with contextlib.ExitStack() as stack:
        for key in sorted({id(k): k for k in keys}.values(), key=id):
            stack.enter_context(call_lock(key))
        yield
