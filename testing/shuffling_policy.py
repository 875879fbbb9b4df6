"""A policy that orders jobs at random each iteration: a worst case for preemption, which the
exactness checks of tests and benchmarks run under; and a scheduler core set up with it."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from services.frontend.tokenizer import encode_prompt
from services.scheduler.core import Job, Policy, SchedulerConfig, SchedulerCore
from services.scheduler.core.profile import PerformanceProfile


class ShufflingPolicy(Policy):
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


def shuffled_core(
    tokenizer,
    prompts: Sequence[tuple[str, int]],
    *,
    seed: int,
    max_batched_tokens: int,
    profile: PerformanceProfile | None = None,
    **config: Any,
) -> tuple[SchedulerCore, list[Job]]:
    """A scheduler core under the shuffling policy, batches of at most 3 jobs, holding one job
    per (prompt text, max_tokens), named j0, j1, ...; `config` is the rest of its
    SchedulerConfig (num_blocks and block_size at least)."""
    settings = SchedulerConfig(
        max_model_len=512, max_batch_size=3, max_batched_tokens=max_batched_tokens, **config
    )
    core = SchedulerCore(settings, ShufflingPolicy(seed), profile=profile)
    jobs = [
        Job(f"j{i}", encode_prompt(tokenizer, text), max_tokens=max_tokens)
        for i, (text, max_tokens) in enumerate(prompts)
    ]
    for job in jobs:
        core.add_job(job)
    return core, jobs


def stage_prompts(label: str) -> list[tuple[str, int]]:
    """Six prompts of 1-4 repeats with 4-14 tokens to go: the pipeline-stage exactness runs."""
    return [
        (f"{label} {i}: " + "pipelines pass activations " * (1 + i % 4), 4 + 5 * (i % 3))
        for i in range(6)
    ]
