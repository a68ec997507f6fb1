"""Prometheus metrics, in a registry per app (tests build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_latency = Histogram(
            "falconrec_request_seconds",
            "request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_latency = Histogram(
            "falconrec_stage_seconds",
            "pipeline stage latency",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.degraded = Counter(
            "falconrec_degraded_total", "responses marked degraded", ["endpoint"], registry=self.registry
        )
        self.shed = Counter(
            "falconrec_shed_total",
            "requests refused for load or time (HTTP 503, gRPC RESOURCE_EXHAUSTED/UNAVAILABLE)",
            ["endpoint"],
            registry=self.registry,
        )
        # Every answer by status, so that 4xx/5xx (and gRPC codes) are visible without reading logs.
        self.responses = Counter(
            "falconrec_responses_total", "HTTP responses", ["endpoint", "status"], registry=self.registry
        )
        # Every answer of the four endpoints by the status HTTP would give it, whichever transport carried it
        # (service/api/handlers.py counts it): the same request over HTTP and gRPC counts the same.
        self.answers = Counter(
            "falconrec_answers_total",
            "answers of /v1 endpoints by HTTP status, both transports",
            ["endpoint", "transport", "status"],
            registry=self.registry,
        )
        self.grpc_responses = Counter(
            "falconrec_grpc_responses_total", "gRPC calls by final status", ["method", "code"], registry=self.registry
        )
        self.cache_lookups = Counter(
            "falconrec_cache_lookups_total", "cache lookups", ["cache", "result"], registry=self.registry
        )

        # Users of ScoreBatch calls being scored now: 0 soon after every batch's client is done or gone.
        self.score_batch_workers = Gauge(
            "falconrec_score_batch_workers", "ScoreBatch workers scoring users now", registry=self.registry
        )

        # The event loop's lateness (service/loop_lag.py): how long a synchronous step held every request back.
        self.loop_lag = Histogram(
            "falconrec_event_loop_lag_seconds",
            "how much later than due the event loop ran a timer",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.loop_lag_max = Gauge(
            "falconrec_event_loop_lag_max_seconds", "the longest event-loop lag since start", registry=self.registry
        )

    def cache(self, name: str, hit: bool) -> None:
        self.cache_lookups.labels(name, "hit" if hit else "miss").inc()

    def stages(self, stages: dict[str, float]) -> None:
        for k, ms in stages.items():
            self.stage_latency.labels(k).observe(ms / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
