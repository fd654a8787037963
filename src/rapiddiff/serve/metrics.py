"""The server's Prometheus metrics (GET /metrics), in a registry of their own (one per app)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
REJECTION_REASONS = ("invalid_request", "queue_full", "draining", "timeout", "client_disconnected", "out_of_memory",
                     "error")  # fmt: skip


class Metrics:
    def __init__(self, queue_depth: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("rapiddiff_queue_depth", "Images queued and not started", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.batch_size = Histogram("rapiddiff_batch_size", "Requested images per pipeline call (padding excluded)",
                                    buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.batch_seconds = Histogram("rapiddiff_batch_seconds", "Duration of one pipeline call",
                                       buckets=SECONDS_BUCKETS, registry=r)  # fmt: skip
        self.latency = Histogram("rapiddiff_request_latency_seconds", "Arrival to answer of a generation request",
                                 buckets=SECONDS_BUCKETS, registry=r)  # fmt: skip
        self.images_generated = Counter("rapiddiff_images_generated", "Images generated and answered", registry=r)
        self.rejections = Counter("rapiddiff_rejections", "Requests answered with an error, by reason",
                                  ["reason"], registry=r)  # fmt: skip
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)  # every series exists from the start (rate() needs a zero)
        self.compiled_shapes = Counter("rapiddiff_compiled_shapes", "Call shapes seen for the first time with "
                                       "--compile (each one compiles)", registry=r)  # fmt: skip

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
