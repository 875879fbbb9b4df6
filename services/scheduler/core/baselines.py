"""Policies to compare skip-join MLFQ with: first come first served, and an oracle."""

from __future__ import annotations

from services.scheduler.core.job import Job
from services.scheduler.core.policy import Policy
from services.scheduler.core.profile import PerformanceProfile


class FcfsPolicy(Policy):
    """Iteration-level continuous batching in arrival order, run to completion (Orca, vLLM)."""

    name = "fcfs"

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}  # insertion order is arrival order

    def add(self, job: Job, now: float) -> int:
        self._jobs[job.job_id] = job
        return 0

    def remove(self, job: Job) -> None:
        self._jobs.pop(job.job_id, None)

    def order(self, now: float) -> list[Job]:
        return list(self._jobs.values())


class SrptOraclePolicy(Policy):
    """Shortest remaining processing time, knowing each job's output length (max_tokens, sent
    with ignore_eos by the benchmark). Unrealisable in production: a bound for benchmarks."""

    name = "srpt-oracle"

    def __init__(self, profile: PerformanceProfile) -> None:
        self._profile = profile
        self._jobs: dict[str, Job] = {}

    def remaining_s(self, job: Job) -> float:
        num_prefill = job.num_uncached_prompt_tokens
        prefill = self._profile.prefill_time(num_prefill) if num_prefill else 0.0
        return prefill + (job.max_tokens - job.num_output_tokens) * self._profile.decode_time(1)

    def add(self, job: Job, now: float) -> int:
        self._jobs[job.job_id] = job
        return 0

    def remove(self, job: Job) -> None:
        self._jobs.pop(job.job_id, None)

    def order(self, now: float) -> list[Job]:
        return sorted(self._jobs.values(), key=self.remaining_s)  # stable: ties by arrival
