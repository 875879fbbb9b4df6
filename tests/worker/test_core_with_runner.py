"""The scheduler core driving the real model runner in one process, with a policy that shuffles
the order every iteration: every kind of batch mix, preemption at every token, and recompute
when blocks run short. Greedy output must still equal transformers'."""

from __future__ import annotations

import pytest

from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from testing.local_pipeline import LocalPipeline, run_to_end
from testing.oracle import assert_greedy_matches, hf_greedy
from testing.shuffling_policy import shuffled_core


@pytest.mark.parametrize(("num_blocks", "seed"), [(40, 1), (40, 2), (10, 3)])
def test_shuffled_preemption_and_recompute_keep_greedy_output_exact(
    tiny_hf_model, tiny_tokenizer, num_blocks, seed
):
    block_size = 16
    executor = Executor(ModelRunner(tiny_hf_model, num_blocks=num_blocks, block_size=block_size))
    pipeline = LocalPipeline([executor])
    pipeline.open()
    prompts = [
        (f"Job {i}: " + "tell me something interesting " * (1 + i % 5), 5 + 6 * (i % 4))
        for i in range(10)
    ]
    core, jobs = shuffled_core(
        tiny_tokenizer, prompts, seed=seed, max_batched_tokens=64,
        num_blocks=num_blocks, block_size=block_size,
    )  # fmt: skip
    mixed_batches = 0

    def count_mixed(decision, result):
        nonlocal mixed_batches
        sizes = [len(c.token_ids) for c in decision.chunks]
        mixed_batches += 1 in sizes and any(n > 1 for n in sizes)

    outputs = run_to_end(core, pipeline, count_mixed)
    pipeline.close()
    assert mixed_batches > 0
    if num_blocks == 10:
        assert core.counters.num_recomputed_jobs > 0
    for job in jobs:
        ref = hf_greedy(tiny_hf_model, job.prompt_token_ids, job.max_tokens)
        assert_greedy_matches(tiny_hf_model, job.prompt_token_ids, outputs[job.job_id], ref)


@pytest.mark.parametrize("kv_policy", ["proactive"])
def test_swapping_through_a_real_kvstore_keeps_greedy_output_exact(
    tiny_hf_model, tiny_tokenizer, kv_policy
):
    """Real model, real kvstore server (gRPC, in this process), background swaps: a pool so
    small that most jobs are swapped out and back in several times."""

    from services.kvstore.server import serve
    from services.scheduler.core.profile import PerformanceProfile
    from services.worker.swapper import Swapper

    server, port = serve("127.0.0.1:0", capacity_bytes=1 << 30)
    num_blocks, block_size = 10, 16
    runner = ModelRunner(tiny_hf_model, num_blocks=num_blocks, block_size=block_size)
    pipeline = LocalPipeline([Executor(runner, Swapper(runner.kv_cache, f"127.0.0.1:{port}"))])
    pipeline.open()
    # A profile where recomputing is dear, so every eviction swaps.
    dear_prefill = PerformanceProfile(prefill_s=((1, 1.0), (512, 512.0)), decode_s=((1, 0.01),))
    prompts = [
        (f"Job {i}: " + "tell me something interesting " * (1 + i % 4), 12 + 5 * (i % 3))
        for i in range(10)
    ]
    core, jobs = shuffled_core(
        tiny_tokenizer, prompts, seed=7, max_batched_tokens=64, profile=dear_prefill,
        num_blocks=num_blocks, block_size=block_size, kv_policy=kv_policy, swap_enabled=True,
        block_bytes=runner.block_bytes, reserve_blocks=2,
    )  # fmt: skip
    try:
        outputs = run_to_end(core, pipeline, timeout_s=120)
    finally:
        pipeline.close()
        server.stop(0)
    stats = core.stats()
    assert stats.counters.num_swapped_in_jobs >= 3 and stats.counters.num_swap_failures == 0
    assert stats.counters.num_recomputed_jobs == 0
    for job in jobs:
        ref = hf_greedy(tiny_hf_model, job.prompt_token_ids, job.max_tokens)
        assert_greedy_matches(tiny_hf_model, job.prompt_token_ids, outputs[job.job_id], ref)
