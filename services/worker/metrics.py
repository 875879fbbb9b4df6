"""Prometheus metrics on a worker's own port (`--metrics-port`): one pipeline stage's view.

Two sources, neither of which touches the forward path: every Result the servicer returns is
handed to `observe` (command counts, forward and wait times, swaps finished), and the KV block
gauges read the executor at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fastserve.worker.v1 import worker_pb2 as wpb
from services.worker.executor import Executor

PREFIX = "fastserve_worker_"
_FORWARD_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_DIRECTIONS = {wpb.SWAP_DIRECTION_OUT: "out", wpb.SWAP_DIRECTION_IN: "in"}


class ExecutorCollector(Collector):
    """KV block gauges, read from the executor when scraped."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    def collect(self) -> Iterator[Metric]:
        executor = self._executor
        yield GaugeMetricFamily(
            PREFIX + "kv_blocks_used", "KV blocks held by jobs", executor.num_used_blocks
        )
        yield GaugeMetricFamily(
            PREFIX + "kv_blocks_total", "KV blocks on this stage", executor.runner.num_blocks
        )
        yield GaugeMetricFamily(
            PREFIX + "swaps_in_flight", "Swaps still running", executor.num_swaps_in_flight
        )


class WorkerMetrics:
    """This worker's registry; `observe` is the WorkerServicer's result observer."""

    def __init__(self, executor: Executor, info: wpb.InfoResponse) -> None:
        self.registry = CollectorRegistry()
        Info(PREFIX + "stage", "This worker's place in the pipeline", registry=self.registry).info(
            {
                "model": info.model_name,
                "device": info.device,
                "stage_index": str(info.stage_index),
                "num_stages": str(info.num_stages),
                "first_layer": str(info.first_layer),
                "num_layers": str(info.num_layers),
            }
        )
        self.commands = Counter(PREFIX + "commands", "Commands executed", registry=self.registry)
        self.command_errors = Counter(
            PREFIX + "command_errors", "Commands that failed", registry=self.registry
        )
        self.forward = Histogram(
            PREFIX + "step_forward_seconds",
            "Model forward (and sampling on the last stage) per step",
            buckets=_FORWARD_BUCKETS_S,
            registry=self.registry,
        )
        self.wait = Counter(
            PREFIX + "stage_wait_seconds",
            "Time spent waiting for the previous stage's activations",
            registry=self.registry,
        )
        self.swaps = Counter(
            PREFIX + "swaps",
            "Swaps finished, by direction and outcome",
            ["direction", "ok"],
            registry=self.registry,
        )
        self.swap_bytes = Counter(
            PREFIX + "swap_bytes",
            "Bytes moved by swaps that succeeded, by direction",
            ["direction"],
            registry=self.registry,
        )
        for direction in _DIRECTIONS.values():  # present at 0 before the first swap
            self.swap_bytes.labels(direction)
        self.registry.register(ExecutorCollector(executor))

    def observe(self, result: wpb.Result) -> None:
        self.commands.inc()
        if result.error:
            self.command_errors.inc()
        if result.forward_us:  # a step (other commands run no forward)
            self.forward.observe(result.forward_us / 1e6)
        self.wait.inc(result.wait_us / 1e6)
        for done in result.swaps_done:
            direction = _DIRECTIONS.get(done.direction, "unspecified")
            self.swaps.labels(direction, str(done.ok).lower()).inc()
            if done.ok:
                self.swap_bytes.labels(direction).inc(done.num_bytes)
