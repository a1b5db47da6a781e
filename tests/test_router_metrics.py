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
