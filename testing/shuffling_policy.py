"""A policy that orders jobs at random each iteration: a worst case for preemption, which the
exactness checks of tests and benchmarks run under."""

from __future__ import annotations

import random

from services.scheduler.core import Job, Policy


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
