"""Token-level preemption end to end: exactness under preemption, head-of-line blocking."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastserve_client import Client
from services.frontend.tokenizer import encode_prompt
from testing.oracle import assert_greedy_matches, hf_greedy
from testing.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


# "on": the worker launches a waiting command before collecting the previous one's tokens, as
# it does on CUDA (off by default on CPU, where it would only delay results).
@pytest.mark.parametrize("launch_ahead", ["auto", "on"])
def test_greedy_outputs_are_exact_under_preemption(
    tiny_model_dir, tiny_hf_model, tiny_tokenizer, launch_ahead
):
    # Batch cap 2, 12 concurrent jobs of mixed lengths, and a block pool small enough that
    # some preempted jobs also lose their blocks and are recomputed.
    stack = Stack.start(
        tiny_model_dir,
        "--max-batch-size",
        "2",
        "--num-blocks",
        "24",
        "--launch-ahead",
        launch_ahead,
    )
    try:
        prompts = [f"Job {i}: " + "tell me something interesting " * (1 + i % 5) for i in range(12)]
        lengths = [6 + 7 * (i % 4) for i in range(12)]

        def run(i):
            states = []
            with Client(stack.address) as client:
                tokens = []
                for chunk in client.generate(
                    prompts[i], max_tokens=lengths[i], temperature=0, ignore_eos=True
                ):
                    tokens.extend(chunk.token_ids)
                    if chunk.state:
                        states.append(chunk.state)
            return tokens, states

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(run, range(12)))
        stats = stack.scheduler_stats()
    finally:
        assert stack.stop() == 0
    num_preempted = sum("preempted" in states for _, states in results)
    assert num_preempted > 0, "the workload should have preempted someone"
    for i, (tokens, states) in enumerate(results):
        assert states[0] == "queued"
        if "preempted" in states:
            assert states.index("running") > states.index("preempted")  # resumed after it
        prompt_ids = encode_prompt(tiny_tokenizer, prompts[i])
        ref = hf_greedy(tiny_hf_model, prompt_ids, lengths[i])
        assert_greedy_matches(tiny_hf_model, prompt_ids, tokens, ref)
    assert stats.policy == "skip-join-mlfq"
    # Twelve jobs for two slots: batches are mostly full, and prefill chunks add tokens.
    assert 1.5 < stats["mean_batch_jobs"] <= 2
    assert stats["mean_batch_tokens"] > stats["mean_batch_jobs"]


def _short_job_latencies(stack: Stack, num_short: int = 8) -> tuple[list[float], list[str]]:
    """Starts one long job, then short jobs one after another while it runs."""
    long_states: list[str] = []
    long_started = threading.Event()

    def long_job():
        with Client(stack.address) as client:
            for chunk in client.generate(
                "Long story: " + "once upon a time " * 60, max_tokens=250, temperature=0,
                ignore_eos=True,
            ):  # fmt: skip
                if chunk.state:
                    long_states.append(chunk.state)
                if chunk.token_ids:
                    long_started.set()

    thread = threading.Thread(target=long_job)
    thread.start()
    assert long_started.wait(60)
    latencies = []
    with Client(stack.address) as client:
        for i in range(num_short):
            started = time.perf_counter()
            client.complete(f"Short {i}", max_tokens=4, temperature=0, ignore_eos=True)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    thread.join(timeout=120)
    return latencies, long_states


def test_short_jobs_are_not_blocked_behind_a_long_one(tiny_model_dir):
    policies = ("fcfs", "skip-join-mlfq")
    with ThreadPoolExecutor(2) as pool:  # both start at once; they run one after the other
        starts = [
            pool.submit(Stack.start, tiny_model_dir, "--max-batch-size", "1", "--policy", policy)
            for policy in policies
        ]
    stacks = [start.result() for start in starts if start.exception() is None]
    try:
        assert len(stacks) == len(policies), "a stack failed to start"
        results = {
            policy: _short_job_latencies(stack)
            for policy, stack in zip(policies, stacks, strict=True)
        }
    finally:
        assert [stack.stop() for stack in stacks] == [0] * len(stacks)
    # The first short job arrives while the long one runs: under fcfs it waits for the rest of
    # it (the later ones may find it finished: with a fast engine the long job takes well under
    # a second), under skip-join MLFQ it preempts it at the next token.
    fcfs = results["fcfs"][0][0]
    mlfq = results["skip-join-mlfq"][0][0]
    ratio = fcfs / mlfq
    print(f"first short job's latency: fcfs {fcfs * 1000:.0f} ms, skip-join-mlfq "
          f"{mlfq * 1000:.0f} ms, ratio {ratio:.1f}x; means "
          f"{statistics.mean(results['fcfs'][0]) * 1000:.0f} / "
          f"{statistics.mean(results['skip-join-mlfq'][0]) * 1000:.0f} ms")  # fmt: skip
    assert ratio >= 3, f"fcfs {fcfs:.3f}s vs skip-join-mlfq {mlfq:.3f}s: only {ratio:.1f}x"
    # The long job was told it was preempted and resumed; under fcfs it never was.
    assert "preempted" in results["skip-join-mlfq"][1]
    assert "running" in results["skip-join-mlfq"][1]
    assert "preempted" not in results["fcfs"][1]
