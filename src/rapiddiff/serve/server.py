"""uvicorn's server with a drain on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import uvicorn

from .batcher import Batcher

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """On SIGTERM, a drain before uvicorn's graceful shutdown: /ready and new requests answer 503 while every accepted
    request finishes; then uvicorn closes the connections and `run` returns (the process exits 0). A second signal,
    or SIGINT, is uvicorn's own: stop now."""

    def __init__(self, config: uvicorn.Config, batcher: Batcher):
        super().__init__(config)
        self.batcher = batcher

    def handle_exit(self, sig: int, frame: Any) -> None:
        if sig == signal.SIGTERM and not self.batcher.draining and not self.should_exit:
            logger.info("SIGTERM: draining (accepted requests finish, new ones get 503)")
            self.batcher.drain()
            threading.Thread(target=self._exit_when_idle, name="rapiddiff-drain", daemon=True).start()
            return
        super().handle_exit(sig, frame)

    def _exit_when_idle(self) -> None:
        self.batcher.wait_idle()
        logger.info("drained: shutting down")
        self.should_exit = True
