"""Prometheus metrics on the scheduler's own port (`--metrics-port`).

The collector reads `engine.stats` at scrape time. The engine thread replaces that frozen
EngineStats whole, so a scrape sees one consistent snapshot without a lock, and the busy loop
never touches a metric object. Names match the frontend's `fastserve_scheduler_*` metrics (which
it builds from the Stats RPC) where both export the same figure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.scheduler.engine import EngineStats

PREFIX = "fastserve_scheduler_"

# EngineStats fields exported as counters (totals since the scheduler started) and gauges.
COUNTERS = {
    "iterations": ("num_iterations", "Scheduler iterations run"),
    "submitted_jobs": ("num_submitted_jobs", "Jobs submitted"),
    "finished_jobs": ("num_finished_jobs", "Jobs finished"),
    "cancelled_jobs": ("num_cancelled_jobs", "Jobs cancelled"),
    "rejected_jobs": ("num_rejected_jobs", "Jobs rejected"),
    "preemptions": ("num_preemptions", "Running jobs that dropped out of the batch"),
    "recomputed_jobs": ("num_recomputed_jobs", "Preemptions by recompute"),
    "swapped_out_jobs": ("num_swapped_out_jobs", "Preemptions by swap-out"),
    "swapped_in_jobs": ("num_swapped_in_jobs", "Swap-ins completed"),
    "swap_failures": ("num_swap_failures", "Swaps the kvstore refused or lost"),
    "swap_out_bytes": ("swap_out_bytes", "Bytes swapped out to the kvstore, all stages"),
    "swap_in_bytes": ("swap_in_bytes", "Bytes swapped in from the kvstore, all stages"),
}
GAUGES = {
    "waiting_jobs": ("num_waiting_jobs", "Jobs waiting (all queue levels)"),
    "running_jobs": ("num_running_jobs", "Jobs in the last iteration's batch"),
    "preempted_jobs": ("num_preempted_jobs", "Jobs that ran before and are not running now"),
    "host_jobs": ("num_host_jobs", "Preempted jobs whose KV is in the kvstore"),
    "frontends": ("num_frontends", "Connected frontends"),
    "kv_blocks_total": ("num_total_blocks", "Device KV blocks"),
    "kv_blocks_free": ("num_free_blocks", "Device KV blocks free"),
    "worker_kv_blocks_used": ("num_worker_used_blocks", "KV blocks the worker reports in use"),
    "swap_bytes_per_second": ("swap_bytes_per_s", "Estimated swap bandwidth"),
    "mean_batch_jobs": ("mean_batch_jobs", "Mean jobs in a batch, last 1000 batches"),
    "mean_batch_tokens": ("mean_batch_tokens", "Mean tokens in a batch, last 1000 batches"),
}


class EngineCollector(Collector):
    """Exports one EngineStats snapshot per scrape; `read_stats` is `lambda: engine.stats`."""

    def __init__(self, read_stats: Callable[[], EngineStats]) -> None:
        self._read_stats = read_stats

    def collect(self) -> Iterator[Metric]:
        s = self._read_stats()
        for name, (attr, doc) in COUNTERS.items():
            yield CounterMetricFamily(PREFIX + name, doc, getattr(s, attr))
        for name, (attr, doc) in GAUGES.items():
            yield GaugeMetricFamily(PREFIX + name, doc, getattr(s, attr))
        yield GaugeMetricFamily(
            PREFIX + "kv_blocks_used",
            "Device KV blocks in use",
            s.num_total_blocks - s.num_free_blocks,
        )
        yield GaugeMetricFamily(
            PREFIX + "mean_iteration_seconds",
            "Mean iteration wall time, last 1000 iterations",
            s.mean_iteration_ms / 1000,
        )
        yield GaugeMetricFamily(
            PREFIX + "mean_forward_seconds",
            "Mean worker forward time per iteration, last 1000 iterations",
            s.mean_forward_ms / 1000,
        )
        depth = GaugeMetricFamily(
            PREFIX + "queue_depth", "Waiting jobs per queue level (0: highest)", labels=["level"]
        )
        for level, num_jobs in enumerate(s.num_jobs_per_level):
            depth.add_metric([str(level)], num_jobs)
        yield depth
        yield from _stage_metrics(s)


def _stage_metrics(s: EngineStats) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        PREFIX + "stage_info",
        "One series per pipeline stage: its worker address and layers (value 1)",
        labels=["stage", "address", "first_layer", "num_layers"],
    )
    used = GaugeMetricFamily(
        PREFIX + "stage_kv_blocks_used", "KV blocks the stage reports in use", labels=["stage"]
    )
    free = GaugeMetricFamily(
        PREFIX + "stage_kv_blocks_free",
        "KV blocks of the stage's own pool not in use (its total minus used)",
        labels=["stage"],
    )
    commands = CounterMetricFamily(
        PREFIX + "stage_commands", "Commands the stage answered", labels=["stage"]
    )
    busy = CounterMetricFamily(
        PREFIX + "stage_busy_seconds", "Time the stage spent computing", labels=["stage"]
    )
    wait = CounterMetricFamily(
        PREFIX + "stage_wait_seconds",
        "Time the stage waited for the previous stage's activations",
        labels=["stage"],
    )
    for view in s.stages:
        stage = str(view.stage_index)
        info.add_metric([stage, view.address, str(view.first_layer), str(view.num_layers)], 1)
        used.add_metric([stage], view.num_used_blocks)
        if view.num_total_blocks:  # known once the stage has answered Info
            free.add_metric([stage], view.num_total_blocks - view.num_used_blocks)
        commands.add_metric([stage], view.num_commands)
        busy.add_metric([stage], view.busy_s)
        wait.add_metric([stage], view.wait_s)
    yield from (info, used, free, commands, busy, wait)


def make_registry(read_stats: Callable[[], EngineStats]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(EngineCollector(read_stats))
    return registry
