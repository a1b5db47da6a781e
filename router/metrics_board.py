"""One /metrics for all the Routers of an application.

Each Router counts what passes through it (requests, tokens, latencies) in its own registry, and
a scrape reaches one Router (Serve's proxy, or the kernel on the direct port, picks it). So every
Router sends its counters' totals here about once a second, and a scrape's Router adds the other
Routers' latest totals to its own. A Router that dies takes its counts with it (Prometheus reads
that as a counter reset). The replica gauges are not summed: every Router reads the same replicas.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import ray
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

logger = logging.getLogger(__name__)

PUSH_PERIOD_S = 1.0


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(frozen=True)
class Family:
    """A counter or histogram family as one Router holds it (its samples' totals)."""

    name: str
    documentation: str
    kind: str
    samples: tuple[Sample, ...]


def snapshot(registry: CollectorRegistry) -> list[Family]:
    """The registry's counters and histograms (`_created` timestamps left out: they do not add)."""
    out = []
    for metric in registry.collect():
        if metric.type not in ("counter", "histogram"):
            continue
        samples = tuple(Sample(s.name, tuple(sorted(s.labels.items())), s.value) for s in metric.samples
                        if not s.name.endswith("_created"))
        out.append(Family(metric.name, metric.documentation, metric.type, samples))
    return out


def merged(snapshots: list[list[Family]]) -> list[Metric]:
    """Sum the snapshots sample by sample (families and samples in the order first seen)."""
    families: dict[str, tuple[Family, dict]] = {}
    for snap in snapshots:
        for fam in snap:
            _, totals = families.setdefault(fam.name, (fam, {}))
            for s in fam.samples:
                key = (s.name, s.labels)
                totals[key] = totals.get(key, 0.0) + s.value
    out = []
    for fam, totals in families.values():
        metric = Metric(fam.name, fam.documentation, fam.kind)
        for (name, labels), value in totals.items():
            metric.add_sample(name, dict(labels), value)
        out.append(metric)
    return out


@ray.remote(num_cpus=0)
class MetricsBoard:
    """The latest totals of each Router of one application."""

    def __init__(self) -> None:
        self.totals: dict[str, list[Family]] = {}

    def report(self, router_id: str, families: list[Family]) -> None:
        self.totals[router_id] = families

    def others(self, router_id: str) -> list[list[Family]]:
        return [f for rid, f in self.totals.items() if rid != router_id]


class BoardLink:
    """A Router's side: pushes its totals every PUSH_PERIOD_S, fetches the others' for a scrape.
    Every failure (the board restarting, Ray shutting down) leaves /metrics with this Router's own."""

    def __init__(self, app_name: str, router_id: str, registry: CollectorRegistry):
        self.name, self.router_id, self.registry = f"raylm-metrics:{app_name}", router_id, registry
        self._task: asyncio.Task | None = None
        self._handle = None

    def _board(self):
        if self._handle is None:
            self._handle = MetricsBoard.options(name=self.name, namespace="raylm", get_if_exists=True).remote()
        return self._handle

    def start(self) -> None:
        """Begin pushing (from the running event loop; without one, at the next call)."""
        if self._task is None:
            try:
                self._task = asyncio.get_running_loop().create_task(self._push_forever())
            except RuntimeError:
                pass

    async def _push_forever(self) -> None:
        while True:
            try:
                await self._board().report.remote(self.router_id, snapshot(self.registry))
            except Exception as e:  # noqa: BLE001 - the board died with the Router that made it: made again
                logger.debug("metrics board push failed: %s", e)
                self._handle = None
            await asyncio.sleep(PUSH_PERIOD_S)

    async def others(self) -> list[list[Family]]:
        try:
            return await asyncio.wait_for(self._board().others.remote(self.router_id), timeout=5)
        except Exception as e:  # noqa: BLE001 - render this Router's own counts
            logger.debug("metrics board read failed: %s", e)
            self._handle = None
            return []
