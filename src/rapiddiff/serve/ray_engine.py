"""`rapiddiff serve --engine ray --replicas N`: the same app on N Ray Serve replicas behind Ray's HTTP proxy.

Each replica is one process with one pipeline (on one GPU when the cluster has GPUs) built by `PipelineSetup.load`,
serving the app of `create_app`: the endpoints, checks, batcher, errors and metrics of `rapiddiff serve`. Ray adds
the proxy (on every node that holds a replica, at --host/--port), routing to the less loaded of two replicas, and
replica restarts. `RAY_ADDRESS` selects a cluster; without it a local Ray starts. Needs `pip install 'rapiddiff[ray]'`.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import ray
from ray import serve

from ..utils.ray_cluster import ray_session
from .app import create_app
from .batcher import ServeSettings
from .setup import PipelineSetup

logger = logging.getLogger(__name__)

APP_NAME = "rapiddiff"
SHUTDOWN_MARGIN_S = 30.0  # beyond --request-timeout, for the answers to go out and the worker to stop
# Ray holds the requests beyond a replica's `max_ongoing_requests` in its router, unanswered (and, if the application
# is deleted meanwhile, until the client gives up). So the replica's own queue must refuse first (429 past --max-queue
# images, a request being at least one image): its limit is the queue, the running batch and this many requests being
# answered at once without work (refusals, /health, /metrics).
ONGOING_MARGIN = 64


def application(setup: PipelineSetup, settings: ServeSettings, replicas: int) -> Any:
    """The Ray Serve application: `replicas` replicas, each with one GPU when the cluster has GPUs, each serving the
    app of `rapiddiff serve` on `setup`'s pipeline. Ray runs the app's lifespan (the batch worker) and, when a replica
    stops, waits for the requests it holds before ending it."""

    def build() -> Any:  # in each replica as it starts: Ray sets CUDA_VISIBLE_DEVICES to the replica's GPU
        return create_app(setup.load(), setup.model, settings)

    gpus = ray.cluster_resources().get("GPU", 0) > 0
    deployment = serve.deployment(
        serve.ingress(build)(),
        name=APP_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_gpus": 1 if gpus else 0, "num_cpus": 1},
        max_ongoing_requests=settings.max_queue + settings.max_batch_size + ONGOING_MARGIN,
        graceful_shutdown_timeout_s=settings.request_timeout + SHUTDOWN_MARGIN_S,
    )
    return deployment.bind()


def deploy(setup: PipelineSetup, settings: ServeSettings, replicas: int, host: str, port: int) -> None:
    """Start Serve's proxy at host:port (if Serve is not running yet) and the application; returns once every replica
    has loaded its pipeline and started. Ray must be initialized."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(setup, settings, replicas), name=APP_NAME, route_prefix="/")


def undeploy() -> None:
    """Delete the application: Ray stops routing to its replicas, each finishes the requests it holds (up to
    --request-timeout), then its app shuts down (the batch worker stops)."""
    serve.delete(APP_NAME)


def run_ray(setup: PipelineSetup, settings: ServeSettings, replicas: int, host: str, port: int) -> int:
    """The command: deploy, serve until SIGTERM or SIGINT, undeploy; 0 when done, 2 when the replicas did not start."""
    with ray_session(num_cpus=replicas) as started:  # a local Ray: one CPU per replica
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):  # ray_session puts the previous handlers back
            signal.signal(sig, lambda *_: stop.set())
        try:
            try:
                deploy(setup, settings, replicas, host, port)
            except RuntimeError as e:  # a replica failed to start (Ray's message holds its traceback)
                logger.error("the replicas did not start: %s", e)
                return 2
            logger.info("serving %s on %d replica(s) at http://%s:%d", setup.model, replicas, host, port)
            while not stop.wait(1.0):
                pass
            logger.info("stopping: the replicas finish the requests they hold")
            undeploy()
            return 0
        finally:
            if started:
                serve.shutdown()
