"""The Ray a command runs on (`--engine ray`): the cluster at RAY_ADDRESS, else a local Ray started for the command."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def ray_session(num_cpus: int, log_to_driver: bool = True) -> Iterator[bool]:
    """Ray for the block: the one this process is already connected to, the cluster at RAY_ADDRESS, or a local Ray
    with `num_cpus` CPUs. Yields whether it connected here; if so it disconnects after (a local Ray stops). The
    SIGTERM and SIGINT handlers are those of before afterwards (ray.init installs its own in the driver)."""
    import ray

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    started = not ray.is_initialized()
    try:
        if started:
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=log_to_driver)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
        yield started
    finally:
        if started:
            ray.shutdown()
        _restore(handlers)


def _restore(handlers: dict[int, Any]) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig, handler in handlers.items():
            if handler is not None:  # None: installed outside Python, cannot be restored from here
                signal.signal(sig, handler)
