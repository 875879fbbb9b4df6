"""Prometheus metrics served on the frontend's HTTP port at /metrics.

Request latencies are observed here as requests end; the scheduler's series are fetched from
its Stats RPC at scrape time (one call per scrape) and exported as they come, names, types and
help included, so the frontend keeps no list of them.

From the same Stats answer the frontend also derives the few gauges of the Gateway API Inference
Extension's model server protocol (PROTOCOL_METRICS), which an endpoint picker (EPP) reads to
route among model replicas: every frontend of a replica reports its scheduler's figures.
"""

from __future__ import annotations

import logging
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from fastserve.scheduler.v1 import scheduler_pb2 as spb
from fastserve.scheduler.v1 import scheduler_pb2_grpc
from services.common.grpc_server import CHANNEL_OPTIONS
from services.common.metric_family import metric_family
from services.frontend.priority import DEFAULT_GRANT, Granted

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATS_TIMEOUT_S = 2.0
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SCHEDULER_PREFIX = "fastserve_scheduler_"
_TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

_METRIC_KINDS = {spb.METRIC_TYPE_COUNTER: "counter", spb.METRIC_TYPE_GAUGE: "gauge"}

# The model server protocol's figures (gateway-api-inference-extension, proposal 003), under
# FastServe's names: protocol field -> metric name. The Helm chart's endpoint picker config names
# these (tests/deploy/test_inference_extension.py checks that the two agree).
PROTOCOL_METRICS = {
    "queued_requests": "fastserve_queued_requests",
    "running_requests": "fastserve_running_requests",
    "kv_cache_usage": "fastserve_kv_cache_usage_ratio",
    "cache_config_info": "fastserve_cache_config_info",
}
# The labels of the cache info gauge: vLLM's names, which the EPP reads by default.
CACHE_INFO_LABELS = ("block_size", "num_gpu_blocks")


def _single_value(stats: spb.StatsResponse, name: str) -> float | None:
    """The value of the scheduler's unlabelled series `name`, or None if it sent none."""
    for metric in stats.metrics:
        if metric.name == name and len(metric.samples) == 1 and not metric.samples[0].labels:
            return metric.samples[0].value
    return None


def protocol_families(stats: spb.StatsResponse):
    """The model server protocol's gauges, derived from one Stats answer. A figure the scheduler
    did not send (or a pool it does not know yet: no blocks) is left out, never reported as 0,
    so an endpoint picker does not take an unknown replica for an idle one."""
    waiting = _single_value(stats, "waiting_jobs")
    if waiting is not None:
        yield GaugeMetricFamily(
            PROTOCOL_METRICS["queued_requests"],
            "Requests queued at this replica's scheduler: admitted, not in the running batch "
            "(new, or preempted); the model server protocol's TotalQueuedRequests",
            value=waiting,
        )
    running = _single_value(stats, "running_jobs")
    if running is not None:
        yield GaugeMetricFamily(
            PROTOCOL_METRICS["running_requests"],
            "Requests in this replica's running batch (in flight on the workers or in the last "
            "batch); the model server protocol's TotalRunningRequests",
            value=running,
        )
    total = _single_value(stats, "kv_blocks_total")
    used = _single_value(stats, "kv_blocks_used")
    if total and used is not None:
        yield GaugeMetricFamily(
            PROTOCOL_METRICS["kv_cache_usage"],
            "Fraction (0 to 1) of this replica's device KV blocks held by jobs; prefix-cache "
            "blocks no job references are free to evict and do not count as used; the model "
            "server protocol's KVCacheUtilization",
            value=min(max(used / total, 0.0), 1.0),
        )
    if total and stats.block_size_tokens:
        family = GaugeMetricFamily(
            PROTOCOL_METRICS["cache_config_info"],
            "KV cache layout of this replica (value 1): block_size, tokens per block; "
            "num_gpu_blocks, device KV blocks in the pool (vLLM's cache_config_info labels)",
            labels=CACHE_INFO_LABELS,
        )
        family.add_metric([str(stats.block_size_tokens), str(int(total))], 1.0)
        yield family


class SchedulerStatsCollector:
    """Exports whatever the last StatsResponse holds, as the scheduler's own /metrics port
    does; `up` is 0 when the scheduler did not answer."""

    def __init__(self) -> None:
        self.stats: spb.StatsResponse | None = None

    def collect(self):
        up = GaugeMetricFamily("fastserve_scheduler_up", "1 if the scheduler answered Stats")
        up.add_metric([], 0.0 if self.stats is None else 1.0)
        yield up
        if self.stats is None:
            return
        for metric in self.stats.metrics:
            kind = _METRIC_KINDS.get(metric.type)
            if kind is None:
                continue  # a type this frontend does not know (a newer scheduler)
            samples = [(dict(sample.labels), sample.value) for sample in metric.samples]
            yield metric_family(SCHEDULER_PREFIX + metric.name, kind, metric.help, samples)
        yield from protocol_families(self.stats)


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
        self.class_requests = Counter(
            "fastserve_priority_requests",
            "Requests that reached the scheduler, by the priority class they ran in and whether "
            "that was capped below the one asked for (the API key's right)",
            ["priority", "capped"],
            registry=self.registry,
        )
        self.class_ttft = Histogram(
            "fastserve_priority_time_to_first_token_seconds",
            "Time from submit to the first generated token, by priority class",
            ["priority"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "fastserve_requests_in_flight", "Requests waiting or running", registry=self.registry
        )
        self.scheduler = SchedulerStatsCollector()
        self.registry.register(self.scheduler)
        self._scheduler_address = scheduler_address
        self._channel: grpc.aio.Channel | None = None

    def observe_request(
        self, finish_reason: str, timer, num_generated: int, priority: Granted = DEFAULT_GRANT
    ) -> None:
        now = time.monotonic()
        self.requests.labels(finish_reason).inc()
        self.class_requests.labels(str(priority.priority), str(priority.capped).lower()).inc()
        self.generation_tokens.inc(num_generated)
        if timer.first_token_s is not None:
            self.ttft.observe(timer.first_token_s - timer.start_s)
            self.class_ttft.labels(str(priority.priority)).observe(
                timer.first_token_s - timer.start_s
            )
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
