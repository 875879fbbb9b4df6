"""The model server protocol's gauges on the frontend's /metrics (what a Gateway API Inference
Extension endpoint picker reads), against a real stack with a known load: N long jobs for a
batch of one, so while none has finished exactly one runs and N - 1 wait."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastserve_client import Client
from services.frontend.metrics import PROTOCOL_METRICS
from testing.stack import Stack

pytestmark = [pytest.mark.e2e]

NUM_JOBS = 4
MAX_TOKENS = 400  # the tiny model's context is 512: long enough to watch the queue
NUM_BLOCKS = 256
BLOCK_SIZE = 8
QUEUED = PROTOCOL_METRICS["queued_requests"]
RUNNING = PROTOCOL_METRICS["running_requests"]
USAGE = PROTOCOL_METRICS["kv_cache_usage"]
CACHE_INFO = PROTOCOL_METRICS["cache_config_info"]


def http_address(stack: Stack) -> str:
    for line in stack.output:
        if match := re.search(r"HTTP http://(\S+)", line):
            return match.group(1)
    raise AssertionError("no HTTP address in the ready line")


def scrape(address: str) -> tuple[dict[str, list[tuple[dict[str, str], float]]], dict[str, str]]:
    """Sample name -> [(labels, value)], and family name -> type, of one /metrics answer."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples, types


def value(samples, name: str) -> float:
    ((labels, found),) = samples[name]
    assert labels == {}, (name, labels)
    return found


def test_protocol_gauges_follow_the_replicas_queue_and_kv_pool(tiny_model_dir):
    stack = Stack.start(
        tiny_model_dir,
        "--max-batch-size", "1",
        "--num-blocks", str(NUM_BLOCKS),
        "--block-size", str(BLOCK_SIZE),
    )  # fmt: skip
    errors: list[BaseException] = []

    def job(i: int) -> None:
        try:
            with Client(stack.address) as client:
                # Prompts sharing full blocks, so finished jobs leave prefix-cache blocks.
                prompt = "Shared system prompt for every job, long enough for blocks. " * 3
                for _ in client.generate(
                    prompt + f"Job {i}.", max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True
                ):
                    pass
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    try:
        address = http_address(stack)
        samples, types = scrape(address)
        assert {types[name] for name in PROTOCOL_METRICS.values()} == {"gauge"}
        assert value(samples, QUEUED) == value(samples, RUNNING) == 0
        assert value(samples, USAGE) == 0
        ((info, one),) = samples[CACHE_INFO]
        assert one == 1
        assert info == {"block_size": str(BLOCK_SIZE), "num_gpu_blocks": str(NUM_BLOCKS)}

        threads = [threading.Thread(target=job, args=(i,)) for i in range(NUM_JOBS)]
        for thread in threads:
            thread.start()
        # One scrape in which every job is in and none is done: the protocol's gauges and the
        # scheduler's counters come from the same Stats answer, so they agree. A job counts as
        # running while an iteration holding it is in flight, so for the moment a preemption
        # (the MLFQ's quantum) swaps the batch's job, the job leaving and the one entering
        # both run: two iterations of a one-stage pipeline are in flight at most.
        deadline = time.monotonic() + 60
        while True:
            samples, _ = scrape(address)
            submitted = value(samples, "fastserve_scheduler_submitted_jobs_total")
            finished = value(samples, "fastserve_scheduler_finished_jobs_total")
            assert finished == 0, "the jobs finished before the test saw them all queued"
            running = value(samples, RUNNING)
            if submitted == NUM_JOBS:
                assert running + value(samples, QUEUED) == NUM_JOBS
                assert running <= 2
                if running == 1:
                    break
            assert time.monotonic() < deadline, "the jobs never all reached the scheduler"
            time.sleep(0.01)
        assert value(samples, QUEUED) == NUM_JOBS - 1  # admitted, waiting for the batch
        assert value(samples, QUEUED) == value(samples, "fastserve_scheduler_waiting_jobs")
        used = value(samples, "fastserve_scheduler_kv_blocks_used")
        assert used > 0
        assert value(samples, USAGE) == pytest.approx(used / NUM_BLOCKS)
        assert 0 < value(samples, USAGE) <= 1

        for thread in threads:
            thread.join(120)
        assert not errors, errors
        # Idle: nothing queued or running, and the finished jobs' prefix-cache blocks (kept,
        # free to evict) do not count as used.
        deadline = time.monotonic() + 20
        while True:
            samples, _ = scrape(address)
            if value(samples, "fastserve_scheduler_finished_jobs_total") == NUM_JOBS and (
                value(samples, RUNNING) == 0
            ):
                break
            assert time.monotonic() < deadline, "the stack did not go idle"
            time.sleep(0.05)
        assert value(samples, QUEUED) == 0
        assert value(samples, "fastserve_scheduler_kv_blocks_cached") > 0
        assert value(samples, USAGE) == 0
    finally:
        assert stack.stop() == 0, "".join(stack.output[-40:])
