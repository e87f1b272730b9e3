"""Prometheus metrics of the retrieval service: latency per stage, outcomes, the served model.

Each service instance owns its registry, so several can live in one process (tests, benchmarks)
and ``/metrics`` shows exactly one service.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Milliseconds matter here: the request budget is tens of milliseconds.
_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0)
STAGES = ("alias", "feast", "tfserving", "milvus", "blend_inputs", "rank")


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "friendrec_requests",
            "Retrieval RPCs by method and final status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "friendrec_request_seconds",
            "End-to-end RPC latency inside the service.",
            ["method"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.stage_latency = Histogram(
            "friendrec_stage_seconds",
            "Latency of each stage of the retrieval path.",
            ["stage"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.dependency_errors = Counter(
            "friendrec_dependency_errors",
            "Failed downstream calls by dependency (feast, tfserving, milvus).",
            ["dependency"],
            registry=self.registry,
        )
        self.queries = Counter(
            "friendrec_queries",
            "Query users by how their features were found (feast, request, defaults).",
            ["source"],
            registry=self.registry,
        )
        self.model_version = Gauge(
            "friendrec_served_model_version",
            "Model version of the live index (the version that answered the last request).",
            registry=self.registry,
        )

    @contextlib.contextmanager
    def stage(self, name: str, timings: dict[str, float]) -> Iterator[None]:
        """Time a stage into the histogram and into the request's own timings."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            timings[name] = timings.get(name, 0.0) + elapsed
            self.stage_latency.labels(name).observe(elapsed)

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Expose /metrics; returns (server, thread) so the caller can shut it down."""
        return start_http_server(port, addr=host, registry=self.registry)
