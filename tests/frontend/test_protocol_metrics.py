"""The model server protocol's gauges the frontend derives from its scheduler's Stats answer
(services/frontend/metrics.py, PROTOCOL_METRICS): names, types, values and what is left out
when a figure is unknown. tests/e2e/test_protocol_metrics.py checks them on a real stack."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fastserve.scheduler.v1 import scheduler_pb2 as spb
from services.frontend.metrics import PROTOCOL_METRICS, FrontendMetrics


def stats(block_size: int = 16, **figures: float) -> spb.StatsResponse:
    return spb.StatsResponse(
        block_size_tokens=block_size,
        metrics=[
            spb.Metric(
                name=name,
                type=spb.METRIC_TYPE_GAUGE,
                help=name,
                samples=[spb.MetricSample(value=value)],
            )
            for name, value in figures.items()
        ],
    )


def exported(response: spb.StatsResponse | None) -> dict[str, tuple[str, list]]:
    """Family name -> (type, [(labels, value)]) of what the frontend's registry renders."""
    metrics = FrontendMetrics()
    metrics.scheduler.stats = response
    text = generate_latest(metrics.registry).decode()
    return {
        family.name: (family.type, [(s.labels, s.value) for s in family.samples])
        for family in text_string_to_metric_families(text)
    }


LOADED = dict(
    waiting_jobs=7, running_jobs=3, kv_blocks_total=200, kv_blocks_used=50, kv_blocks_free=150
)


def test_gauges_carry_the_schedulers_figures():
    found = exported(stats(**LOADED))
    assert found[PROTOCOL_METRICS["queued_requests"]] == ("gauge", [({}, 7.0)])
    assert found[PROTOCOL_METRICS["running_requests"]] == ("gauge", [({}, 3.0)])
    assert found[PROTOCOL_METRICS["kv_cache_usage"]] == ("gauge", [({}, 0.25)])
    assert found[PROTOCOL_METRICS["cache_config_info"]] == (
        "gauge",
        [({"block_size": "16", "num_gpu_blocks": "200"}, 1.0)],
    )
    # The scheduler's own series still pass through, under their own names.
    assert found["fastserve_scheduler_waiting_jobs"] == ("gauge", [({}, 7.0)])


@pytest.mark.parametrize(("used", "ratio"), [(0, 0.0), (200, 1.0), (1, 0.005)])
def test_usage_is_a_fraction_of_the_pool(used, ratio):
    found = exported(stats(**{**LOADED, "kv_blocks_used": used}))
    ((_, value),) = found[PROTOCOL_METRICS["kv_cache_usage"]][1]
    assert value == pytest.approx(ratio)


def test_unknown_figures_are_left_out_not_zero():
    # The scheduler did not answer: only `fastserve_scheduler_up` 0, nothing an endpoint
    # picker would read as an idle replica.
    found = exported(None)
    assert found["fastserve_scheduler_up"] == ("gauge", [({}, 0.0)])
    assert not set(PROTOCOL_METRICS.values()) & set(found)
    # No pool yet (the workers have not answered): queue figures, but no usage or layout.
    found = exported(stats(**{**LOADED, "kv_blocks_total": 0, "kv_blocks_used": 0}))
    assert PROTOCOL_METRICS["queued_requests"] in found
    assert PROTOCOL_METRICS["kv_cache_usage"] not in found
    assert PROTOCOL_METRICS["cache_config_info"] not in found


def test_metrics_endpoint_exports_them_from_the_stats_it_fetched():
    metrics = FrontendMetrics("127.0.0.1:1")  # nothing listens: Stats fails

    async def render() -> str:
        try:
            return (await metrics.render(num_in_flight=0)).decode()
        finally:
            await metrics.close()

    text = asyncio.run(render())
    assert "fastserve_scheduler_up 0.0" in text
    assert PROTOCOL_METRICS["queued_requests"] not in text
