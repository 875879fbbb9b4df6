"""`fastserve up --metrics`: the scheduler and the worker each serve /metrics on a port they
pick and log, and the figures there move as requests run."""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastserve_client import Client
from testing.stack import Stack

pytestmark = [pytest.mark.e2e]

NUM_REQUESTS = 3
METRICS_LINE = re.compile(r"\[(\w+)\] .* metrics on (http://\S+/metrics)")


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)]."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_scheduler_and_worker_metrics_ports(tiny_model_dir):
    # Info level: the metrics address is logged, never printed on stdout.
    stack = Stack.start(tiny_model_dir, "--metrics", "--log-level", "info")
    try:
        urls = dict(m.groups() for line in stack.output if (m := METRICS_LINE.search(line)))
        assert set(urls) == {"scheduler", "worker"}, "".join(stack.output[-40:])
        with Client(stack.address) as client:
            for i in range(NUM_REQUESTS):
                client.complete(f"Count to {i}:", max_tokens=8, temperature=0)
        stack.wait_for_stats(lambda s: s["finished_jobs"] >= NUM_REQUESTS)

        scheduler = scrape(urls["scheduler"])
        ((_, finished),) = scheduler["fastserve_scheduler_finished_jobs_total"]
        assert finished >= NUM_REQUESTS
        assert scheduler["fastserve_scheduler_iterations_total"][0][1] > 0
        levels = {labels["level"] for labels, _ in scheduler["fastserve_scheduler_queue_depth"]}
        assert "0" in levels
        (stage,) = scheduler["fastserve_scheduler_stage_kv_blocks_used"]
        assert stage[0] == {"stage": "0"}

        worker = scrape(urls["worker"])
        assert worker["fastserve_worker_commands_total"][0][1] > 0
        assert worker["fastserve_worker_step_forward_seconds_count"][0][1] > 0
        assert worker["fastserve_worker_kv_blocks_total"][0][1] > 0
        ((info, _),) = worker["fastserve_worker_stage_info"]
        assert (info["stage_index"], info["num_stages"]) == ("0", "1")
    finally:
        assert stack.stop() == 0, "".join(stack.output[-40:])
