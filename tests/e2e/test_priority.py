"""Priority classes end to end: a burst of high-class requests displaces running low-class jobs
(vLLM issue 40004 is the complaint that a waiting high-priority request cannot), outputs stay
exact, and a key without the right is capped. That the displacement happens at the very next
iteration is checked on the core's decisions (tests/scheduler/test_priority_classes.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastserve_client import Client
from services.frontend.tokenizer import encode_prompt
from testing.oracle import assert_greedy_matches, hf_greedy
from testing.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GOLD, SILVER = "gold-key", "silver-key"
LOW_TOKENS, HIGH_TOKENS = 160, 8


def test_a_burst_of_high_class_requests_preempts_running_low_class_jobs(
    tiny_model_dir, tiny_hf_model, tiny_tokenizer
):
    # Under fcfs, which never preempts by itself (skip-join MLFQ would also put these short
    # arrivals ahead of the long jobs it has demoted): what displaces the jobs is the class.
    stack = Stack.start(
        tiny_model_dir,
        "--policy", "fcfs", "--max-batch-size", "4",
        "--priority-classes", "2", "--default-priority", "1", "--top-priority", "1",
        "--api-key", f"{GOLD} top-priority=0", "--api-key", SILVER,
    )  # fmt: skip
    results: dict[str, dict] = {}
    running = threading.Semaphore(0)

    def run(name: str, key: str, prompt: str, max_tokens: int, priority: int | None) -> None:
        record: dict = {"tokens": [], "states": [], "prompt": prompt, "max_tokens": max_tokens}
        results[name] = record
        with Client(stack.address, api_key=key) as client:
            for chunk in client.generate(
                prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True, priority=priority
            ):
                if chunk.token_ids and not record["tokens"]:
                    running.release()
                record["tokens"].extend(chunk.token_ids)
                if chunk.state:
                    record["states"].append(chunk.state)
                if chunk.finish_reason:
                    record["finished_at"] = time.monotonic()
                    record["class"] = (chunk.priority, chunk.priority_capped)

    try:
        with ThreadPoolExecutor(8) as pool:
            low = [
                pool.submit(run, f"low{i}", SILVER, f"Low {i}: a long story " * 3, LOW_TOKENS, None)
                for i in range(4)
            ]
            for _ in range(4):  # all four hold the batch
                assert running.acquire(timeout=60)
            high = [
                pool.submit(run, f"high{i}", GOLD, f"Urgent {i}: answer", HIGH_TOKENS, 0)
                for i in range(3)
            ]
            # Asks for class 0 with a key that may not use it: capped to class 1.
            capped = pool.submit(run, "capped", SILVER, "Me first: please", HIGH_TOKENS, 0)
            for future in [*low, *high, capped]:
                future.result(timeout=120)
        stats = stack.wait_until_idle()
    finally:
        assert stack.stop() == 0

    lows = [results[f"low{i}"] for i in range(4)]
    highs = [results[f"high{i}"] for i in range(3)]
    assert all(r["class"] == (0, False) for r in highs)
    assert results["capped"]["class"] == (1, True)
    assert all(r["class"] == (1, False) for r in lows)
    # Three of the four places went to the burst: three low-class jobs were displaced...
    assert sum("preempted" in r["states"] for r in lows) >= 3
    # ... and every high-class job finished while all the low-class ones still ran.
    assert max(r["finished_at"] for r in highs) < min(r["finished_at"] for r in lows)
    # The capped request waited like any class-1 job: behind the burst.
    assert results["capped"]["finished_at"] > min(r["finished_at"] for r in highs)
    assert stats["preemptions"] >= 3
    for record in results.values():
        prompt_ids = encode_prompt(tiny_tokenizer, record["prompt"])
        ref = hf_greedy(tiny_hf_model, prompt_ids, record["max_tokens"])
        assert_greedy_matches(tiny_hf_model, prompt_ids, record["tokens"], ref)
