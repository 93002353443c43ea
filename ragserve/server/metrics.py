"""Prometheus metrics of the server, in a registry of its own (never the global one).

Counters and histograms are updated as queries finish; gauges (queue depth, KV) are read
from the engine, the planner and the admission counters at scrape time.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ragserve.domain import QueryResult

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.num_queries = 0
        self.num_cancelled: dict[str, int] = {}    # by cause, for /v1/stats
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ragserve_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.queries = Counter("ragserve_queries", "Queries answered", registry=r)
        self.plans = Counter("ragserve_plans_chosen", "Plans run, by synthesis method and why",
                             ["method", "reason"], registry=r)
        self.cancelled = Counter("ragserve_queries_cancelled", "Queries cancelled, by cause",
                                 ["cause"], registry=r)
        self.rejected = Counter("ragserve_rejected", "Requests rejected with 503 (admission)",
                                ["what"], registry=r)
        self.ingested_chunks = Counter("ragserve_ingested_chunks", "Chunks stored by ingest", registry=r)
        self.ttft = Histogram("ragserve_ttft_seconds", "Query arrival to the answer's first token",
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.latency = Histogram("ragserve_query_latency_seconds", "Query arrival to answer",
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.confidence = Histogram("ragserve_profiler_confidence", "METIS profiler confidence per query",
                                    buckets=CONFIDENCE_BUCKETS, registry=r)
        self.queue_depth = Gauge("ragserve_queue_depth", "Queries admitted by the server and not finished",
                                 registry=r)
        self.max_queue = Gauge("ragserve_queue_limit", "server.max_queue", registry=r)
        self.scheduler_waiting = Gauge("ragserve_scheduler_waiting", "Queries waiting for KV in the planner",
                                       registry=r)
        self.engine_running = Gauge("ragserve_engine_running_calls", "LLM calls in the running batch",
                                    registry=r)
        self.engine_waiting = Gauge("ragserve_engine_waiting_calls", "LLM calls queued for KV", registry=r)
        self.kv_free = Gauge("ragserve_kv_free_tokens", "Free KV slots (net of METIS reservations)",
                             registry=r)
        self.kv_capacity = Gauge("ragserve_kv_capacity_tokens", "Total KV slots of the engine", registry=r)

    def observe_query(self, result: QueryResult) -> None:
        self.num_queries += 1
        self.queries.inc()
        self.plans.labels(result.plan.method.value, result.decision.reason or "given").inc()
        self.ttft.observe(result.timings.ttft_s)
        self.latency.observe(result.timings.total_s)
        confidence = result.decision.profile.confidence if result.decision.profile is not None else None
        if confidence is not None:
            self.confidence.observe(float(confidence))

    def observe_cancel(self, cause: str) -> None:
        self.num_cancelled[cause] = self.num_cancelled.get(cause, 0) + 1
        self.cancelled.labels(cause).inc()

    def render(self, engine: Any, planner: Any, in_flight: int, limit: int) -> bytes:
        """The exposition text, with gauges refreshed from the live objects."""
        self.queue_depth.set(in_flight)
        self.max_queue.set(limit)
        planned = planner.stats() if planner is not None else None
        if planned is not None:
            self.scheduler_waiting.set(planned.num_waiting)
        if engine is not None:
            stats = engine.stats()
            self.engine_running.set(stats.num_running)
            self.engine_waiting.set(stats.num_waiting)
            self.kv_capacity.set(stats.kv_capacity_tokens)
            # METIS reserves a query's KV from admission on: its free KV is capacity - max(used, reserved)
            free = planned.kv_free_tokens if planned is not None else None
            self.kv_free.set(stats.kv_free_tokens if free is None else free)
        return generate_latest(self.registry)
