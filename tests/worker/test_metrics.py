"""A worker's metrics port: what one stage exports from its results and its executor."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fastserve.worker.v1 import worker_pb2 as wpb
from services.worker.metrics import WorkerMetrics


def samples(metrics: WorkerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_results_and_executor_state_become_metrics():
    executor = SimpleNamespace(
        num_used_blocks=7, num_swaps_in_flight=1, runner=SimpleNamespace(num_blocks=32)
    )
    info = wpb.InfoResponse(
        model_name="tiny", device="cpu", stage_index=1, num_stages=2, first_layer=2, num_layers=2
    )
    metrics = WorkerMetrics(executor, info)  # type: ignore[arg-type]
    metrics.observe(wpb.Result(forward_us=20_000, wait_us=5_000))
    metrics.observe(wpb.Result(forward_us=0, error="reset: bad pipeline id"))  # not a step
    metrics.observe(
        wpb.Result(
            swaps_done=[
                wpb.SwapDone(direction=wpb.SWAP_DIRECTION_OUT, ok=True, num_bytes=4096),
                wpb.SwapDone(direction=wpb.SWAP_DIRECTION_IN, ok=False, num_bytes=0),
            ]
        )
    )
    got = samples(metrics)

    def value(name: str, **labels: str) -> float:
        return got[("fastserve_worker_" + name, tuple(sorted(labels.items())))]

    assert value("commands_total") == 3 and value("command_errors_total") == 1
    assert value("step_forward_seconds_count") == 1
    assert value("step_forward_seconds_sum") == 0.02
    assert value("stage_wait_seconds_total") == 0.005
    assert value("swap_bytes_total", direction="out") == 4096
    assert value("swap_bytes_total", direction="in") == 0
    assert value("swaps_total", direction="in", ok="false") == 1
    assert value("kv_blocks_used") == 7 and value("kv_blocks_total") == 32
    assert value("swaps_in_flight") == 1
    stage = {"model": "tiny", "device": "cpu", "stage_index": "1", "num_stages": "2"}
    assert value("stage_info", first_layer="2", num_layers="2", **stage) == 1
