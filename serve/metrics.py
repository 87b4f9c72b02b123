"""The server's Prometheus metrics (prometheus-client), in a registry of its own per app."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds from 50 us to 2.5 s, for queue and compute times: p99 is readable from the buckets.
TIME_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Request counts, inference and execution counts, batch/queue/compute histograms, pending requests."""

    def __init__(self, model: str, max_batch: int, pending: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("bnpipe_http_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "status"], registry=r)
        self.inferences = Counter("bnpipe_inference_count", "Images inferred (rows of all batches)",
                                  ["model"], registry=r).labels(model)
        self.executions = Counter("bnpipe_inference_exec_count", "Model runs (batches executed)",
                                  ["model"], registry=r).labels(model)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, max_batch})
        self.batch_size = Histogram("bnpipe_batch_size", "Images per model run", ["model"],
                                    buckets=[s for s in sizes if s <= max_batch], registry=r).labels(model)
        self.queue_time = Histogram("bnpipe_queue_seconds", "Time a request waited in the batcher's queue",
                                    ["model"], buckets=TIME_BUCKETS, registry=r).labels(model)
        self.compute_time = Histogram("bnpipe_compute_seconds", "Time of one model run (a batch)",
                                      ["model"], buckets=TIME_BUCKETS, registry=r).labels(model)
        g = Gauge("bnpipe_pending_requests", "Inference requests accepted and not yet answered", ["model"],
                  registry=r)
        g.labels(model).set_function(pending)
        self._counters: dict[tuple[str, str, int], Counter] = {}

    def request(self, route: str, method: str, status: int) -> None:
        """Count one answered HTTP request (the labelled child is looked up once per combination)."""
        key = (route, method, status)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = self.requests.labels(route, method, str(status))
        child.inc()

    def batch(self, images: int, requests: int, queue_seconds: list[float], compute_seconds: float) -> None:
        """Record one model run; the batcher's ``on_batch`` hook, called in its worker thread."""
        self.inferences.inc(images)
        self.executions.inc()
        self.batch_size.observe(images)
        self.compute_time.observe(compute_seconds)
        for q in queue_seconds:
            self.queue_time.observe(q)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
