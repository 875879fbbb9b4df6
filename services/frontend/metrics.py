"""Prometheus metrics served on the frontend's HTTP port at /metrics.

Request latencies are observed here as requests end; the scheduler's counters and gauges are
fetched from its Stats RPC at scrape time (one call per scrape) and exported as they are, so
the frontend holds no copy that could drift.
"""

from __future__ import annotations

import logging
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fastserve.scheduler.v1 import scheduler_pb2 as spb
from fastserve.scheduler.v1 import scheduler_pb2_grpc
from services.common.grpc_server import CHANNEL_OPTIONS

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATS_TIMEOUT_S = 2.0
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# StatsResponse fields exported as counters (totals since the scheduler started) and gauges.
_SCHEDULER_COUNTERS = {
    "iterations": ("num_iterations", "Scheduler iterations run"),
    "submitted_jobs": ("num_submitted_jobs", "Jobs submitted"),
    "finished_jobs": ("num_finished_jobs", "Jobs finished"),
    "cancelled_jobs": ("num_cancelled_jobs", "Jobs cancelled"),
    "rejected_jobs": ("num_rejected_jobs", "Jobs rejected"),
    "recomputed_jobs": ("num_recomputed_jobs", "Preemptions by recompute"),
    "swapped_out_jobs": ("num_swapped_out_jobs", "Preemptions by swap-out"),
    "swapped_in_jobs": ("num_swapped_in_jobs", "Swap-ins completed"),
    "swap_failures": ("num_swap_failures", "Swaps the kvstore refused or lost"),
}
_SCHEDULER_GAUGES = {
    "waiting_jobs": ("num_waiting_jobs", "Jobs waiting (all queue levels)"),
    "running_jobs": ("num_running_jobs", "Jobs in the last iteration's batch"),
    "host_jobs": ("num_host_jobs", "Preempted jobs whose KV is in the kvstore"),
    "kv_blocks_total": ("num_total_blocks", "Device KV blocks"),
    "kv_blocks_free": ("num_free_blocks", "Device KV blocks free"),
    "worker_kv_blocks_used": ("num_worker_used_blocks", "KV blocks the worker reports in use"),
    "frontends": ("num_frontends", "Connected frontends"),
    "swap_bytes_per_second": ("swap_bytes_per_s", "Estimated swap bandwidth"),
    "mean_iteration_seconds": ("mean_iteration_ms", "Mean iteration wall time"),
}


class SchedulerStatsCollector:
    """Exports the last StatsResponse; `up` is 0 when the scheduler did not answer."""

    def __init__(self) -> None:
        self.stats: spb.StatsResponse | None = None

    def collect(self):
        up = GaugeMetricFamily("fastserve_scheduler_up", "1 if the scheduler answered Stats")
        up.add_metric([], 0.0 if self.stats is None else 1.0)
        yield up
        if self.stats is None:
            return
        s = self.stats
        for name, (attr, doc) in _SCHEDULER_COUNTERS.items():
            yield CounterMetricFamily(f"fastserve_scheduler_{name}", doc, getattr(s, attr))
        for name, (attr, doc) in _SCHEDULER_GAUGES.items():
            value = getattr(s, attr)
            if attr == "mean_iteration_ms":
                value /= 1000.0
            yield GaugeMetricFamily(f"fastserve_scheduler_{name}", doc, value)
        yield GaugeMetricFamily(
            "fastserve_scheduler_kv_blocks_used",
            "Device KV blocks in use",
            s.num_total_blocks - s.num_free_blocks,
        )


class FrontendMetrics:
    """The frontend's own request metrics, in a registry of its own (tests make several)."""

    def __init__(self, scheduler_address: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "fastserve_time_to_first_token_seconds",
            "Time from submit to the first generated token",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "fastserve_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            buckets=_TPOT_BUCKETS_S,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "fastserve_e2e_request_latency_seconds",
            "Time from submit to the last token",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.requests = Counter(
            "fastserve_requests",
            "Requests that reached the scheduler, by finish reason",
            ["finish_reason"],
            registry=self.registry,
        )
        self.http_responses = Counter(
            "fastserve_http_responses",
            "HTTP responses by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "fastserve_generation_tokens",
            "Output tokens generated",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "fastserve_requests_in_flight", "Requests waiting or running", registry=self.registry
        )
        self.scheduler = SchedulerStatsCollector()
        self.registry.register(self.scheduler)
        self._scheduler_address = scheduler_address
        self._channel: grpc.aio.Channel | None = None

    def observe_request(self, finish_reason: str, timer, num_generated: int) -> None:
        now = time.monotonic()
        self.requests.labels(finish_reason).inc()
        self.generation_tokens.inc(num_generated)
        if timer.first_token_s is not None:
            self.ttft.observe(timer.first_token_s - timer.start_s)
            if num_generated > 1:
                self.tpot.observe((now - timer.first_token_s) / (num_generated - 1))
        if finish_reason in ("stop", "length"):
            self.e2e.observe(now - timer.start_s)

    async def render(self, num_in_flight: int) -> bytes:
        """The exposition text, after fetching fresh scheduler stats."""
        self.in_flight.set(num_in_flight)
        self.scheduler.stats = await self._fetch_stats()
        return generate_latest(self.registry)

    async def _fetch_stats(self) -> spb.StatsResponse | None:
        if self._scheduler_address is None:
            return None
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self._scheduler_address, options=CHANNEL_OPTIONS
            )
        stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        try:
            return await stub.Stats(spb.StatsRequest(), timeout=STATS_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.warning("scheduler Stats failed: %s", exc.details())
            return None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
