"""Prometheus metrics on the scheduler's own port (`--metrics-port`), from the stats table.

The collector reads `engine.stats` at scrape time. The engine thread replaces that frozen
EngineStats whole, so a scrape sees one consistent snapshot without a lock, and the busy loop
never touches a metric object. The frontends export the same series from the Stats RPC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from services.common.metric_family import metric_family
from services.scheduler.engine_stats import EngineStats
from services.scheduler.stats_table import PREFIX, TABLE


class EngineCollector(Collector):
    """Exports one EngineStats snapshot per scrape; `read_stats` is `lambda: engine.stats`."""

    def __init__(self, read_stats: Callable[[], EngineStats]) -> None:
        self._read_stats = read_stats

    def collect(self) -> Iterator[Metric]:
        stats = self._read_stats()
        for series in TABLE:
            yield metric_family(
                PREFIX + series.name, series.kind.value, series.help, series.samples(stats)
            )


def make_registry(read_stats: Callable[[], EngineStats]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(EngineCollector(read_stats))
    return registry
