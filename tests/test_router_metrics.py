"""router.metrics.observe_many: k observations of one value for the price of one, exposed exactly as
k calls of Histogram.observe would be."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from router.metrics import observe_many

BUCKETS = (0.005, 0.01, 0.1, 1.0)


def _hist():
    registry = CollectorRegistry()
    return registry, Histogram("gap_seconds", "gaps", buckets=BUCKETS, registry=registry)


@pytest.mark.parametrize("value,count", [(0.001, 1), (0.007, 5), (0.1, 3), (2.5, 4), (0.05, 0)])
def test_observe_many_equals_repeated_observe(value, count):
    many_reg, many = _hist()
    loop_reg, loop = _hist()
    observe_many(many, value, count)
    for _ in range(count):
        loop.observe(value)
    assert _samples(many_reg) == _samples(loop_reg)


def _samples(registry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def _router_registry(requests_200: int, gaps: list[float]):
    registry, hist = _hist()
    from prometheus_client import Counter

    Counter("raylm_requests", "by status", ["status"], registry=registry).labels(status="200").inc(requests_200)
    for g in gaps:
        hist.observe(g)
    return registry


def test_merged_snapshots_sum_every_sample_of_every_router():
    from prometheus_client.parser import text_string_to_metric_families

    from router.metrics_board import merged, snapshot

    a = _router_registry(3, [0.001, 0.2])
    b = _router_registry(4, [0.007, 0.007, 5.0])

    class Both:
        def collect(self):
            return merged([snapshot(a), snapshot(b)])

    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for fam in text_string_to_metric_families(generate_latest(Both()).decode()) for s in fam.samples}
    assert values[("raylm_requests_total", (("status", "200"),))] == 7
    assert values[("gap_seconds_count", ())] == 5
    assert values[("gap_seconds_sum", ())] == pytest.approx(0.001 + 0.2 + 0.007 * 2 + 5.0)
    assert values[("gap_seconds_bucket", (("le", "0.01"),))] == 3  # 0.001, 0.007, 0.007
    assert values[("gap_seconds_bucket", (("le", "+Inf"),))] == 5
    assert not any(name.endswith("_created") for name, _ in values)
