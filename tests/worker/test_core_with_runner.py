"""The scheduler core driving the real model runner in one process, with a policy that shuffles
the order every iteration: every kind of batch mix, preemption at every token, and recompute
when blocks run short. Greedy output must still equal transformers'."""

from __future__ import annotations

import random

import pytest

from services.frontend.tokenizer import encode_prompt
from services.scheduler.core import Job, SchedulerConfig, SchedulerCore
from services.worker.batch import Sampling, SeqChunk
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from tests.oracle import assert_greedy_matches, hf_greedy


class ShufflingPolicy:
    """Orders jobs at random each iteration (a worst case for preemption)."""

    name = "shuffle"

    def __init__(self, seed: int) -> None:
        self._jobs: dict[str, Job] = {}
        self._rng = random.Random(seed)

    def add(self, job, now):
        self._jobs[job.job_id] = job
        return 0

    def remove(self, job):
        self._jobs.pop(job.job_id, None)

    def order(self, now):
        jobs = list(self._jobs.values())
        self._rng.shuffle(jobs)
        return jobs

    def on_iteration(self, ran, elapsed_s, now):
        pass

    def level(self, job):
        return 0


@pytest.mark.parametrize(("num_blocks", "seed"), [(40, 1), (40, 2), (10, 3)])
def test_shuffled_preemption_and_recompute_keep_greedy_output_exact(
    tiny_hf_model, tiny_tokenizer, num_blocks, seed
):
    block_size = 16
    executor = Executor(ModelRunner(tiny_hf_model, num_blocks=num_blocks, block_size=block_size))
    config = SchedulerConfig(
        num_blocks=num_blocks, block_size=block_size, max_model_len=512, max_batch_size=3,
        max_batched_tokens=64,
    )  # fmt: skip
    core = SchedulerCore(config, ShufflingPolicy(seed))
    jobs = []
    for i in range(10):
        prompt = f"Job {i}: " + "tell me something interesting " * (1 + i % 5)
        job = Job(f"j{i}", encode_prompt(tiny_tokenizer, prompt), max_tokens=5 + 6 * (i % 4))
        jobs.append(job)
        core.add_job(job)
    outputs: dict[str, list[int]] = {job.job_id: [] for job in jobs}
    mixed_batches = 0
    while core.has_work():
        decision = core.schedule()
        executor.free(decision.free_job_ids)
        sizes = [len(c.token_ids) for c in decision.chunks]
        mixed_batches += 1 in sizes and any(n > 1 for n in sizes)
        output = executor.step(
            [
                SeqChunk(c.job_id, c.token_ids, c.start_pos, c.block_ids, c.sample, Sampling())
                for c in decision.chunks
            ]
        )
        for event in core.update(decision, dict(output.tokens)):
            outputs[event.job_id].extend(event.token_ids)
    assert mixed_batches > 0
    if num_blocks == 10:
        assert core.stats().num_recomputed_jobs > 0
    for job in jobs:
        ref = hf_greedy(tiny_hf_model, job.prompt_token_ids, job.max_tokens)
        assert_greedy_matches(tiny_hf_model, job.prompt_token_ids, outputs[job.job_id], ref)
