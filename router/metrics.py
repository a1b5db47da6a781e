"""Prometheus metrics of the router, served on GET /metrics.

Request counts, token counts and latencies are observed here as responses stream through (and
summed over the application's Routers at a scrape: router.metrics_board);
per-replica running/waiting/KV usage come from each replica's LoadReport (its
`record_routing_stats`, which Serve polls and hands to our request router, router.routing.ROUTERS).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from replicas.protocol import LoadReport
from router.metrics_board import Family, merged, snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _ReplicaCollector:
    def __init__(self, stats: Callable[[], dict[str, LoadReport]], num_live: Callable[[], int]):
        self._stats = stats
        self._num_live = num_live

    def collect(self):
        running = GaugeMetricFamily("raylm_replica_running_requests", "Requests running on a replica", labels=["replica"])
        waiting = GaugeMetricFamily("raylm_replica_waiting_requests", "Requests waiting on a replica", labels=["replica"])
        kv = GaugeMetricFamily("raylm_replica_kv_cache_usage", "Fraction of a replica's KV blocks in use", labels=["replica"])
        started = CounterMetricFamily("raylm_replica_requests", "Requests a replica has started (from any router "
                                      "or client)", labels=["replica"])
        steps = CounterMetricFamily("raylm_replica_engine_steps", "Engine steps a replica has run", labels=["replica"])
        step_seconds = CounterMetricFamily("raylm_replica_engine_step_seconds", "Wall time of a replica's engine "
                                           "steps, summed", labels=["replica"])
        live = GaugeMetricFamily("raylm_live_replicas", "Replicas the router can send requests to")
        stats = self._stats()
        blocks = GaugeMetricFamily("raylm_replica_kv_cache_blocks", "A replica's KV cache blocks",
                                   labels=["replica", "state"])
        for rid, s in stats.items():
            started.add_metric([rid], float(s.num_requests))
            running.add_metric([rid], float(s.num_running))
            waiting.add_metric([rid], float(s.num_waiting))
            kv.add_metric([rid], s.kv_cache_usage)
            blocks.add_metric([rid, "total"], float(s.num_total_blocks))
            blocks.add_metric([rid, "free"], float(s.num_free_blocks))
            steps.add_metric([rid], float(s.num_steps))
            step_seconds.add_metric([rid], s.step_seconds)
        live.add_metric([], float(self._num_live()))  # what /health reports
        yield from (running, waiting, kv, blocks, started, steps, step_seconds, live)


def observe_many(hist: Histogram, value: float, count: int) -> None:
    """`count` observations of one value at the cost of one (a chunk of k tokens: k equal gaps)."""
    bounds, buckets, total = getattr(hist, "_upper_bounds", None), getattr(hist, "_buckets", None), \
        getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total is None:  # another prometheus_client layout
        for _ in range(count):
            hist.observe(value)
        return
    total.inc(value * count)
    for bound, bucket in zip(bounds, buckets):
        if value <= bound:
            bucket.inc(count)
            break


class Metrics:
    def __init__(self, replica_stats: Callable[[], dict[str, LoadReport]], num_live_replicas: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("raylm_requests", "Completion requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("raylm_prompt_tokens", "Prompt tokens (embeds rows included)", registry=r)
        self.generation_tokens = Counter("raylm_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("raylm_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("raylm_inter_token_latency_seconds", "Time between tokens of one completion",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.retries = Counter("raylm_request_retries", "Prompts sent again after their replica was lost",
                               registry=r)
        self.e2e = Histogram("raylm_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self._replicas = _ReplicaCollector(replica_stats, num_live_replicas)  # not summed over Routers

    def render(self, other_routers: list[list[Family]] = ()) -> bytes:
        """This Router's counts plus the other Routers' latest totals (router.metrics_board), and the
        replicas' gauges."""
        own = snapshot(self.registry)
        replicas = self._replicas

        class _Everything:
            def collect(self):
                yield from merged([own, *other_routers])
                yield from replicas.collect()

        return generate_latest(_Everything())
