"""Scheduling policies: the order in which jobs get a place in the next batch.

A policy only orders jobs; SchedulerCore turns the order into a batch under the batch-size,
token and KV-block limits. Re-forming the batch from this order at every iteration is what makes
preemption token-level: a job that drops out of the prefix that fits is preempted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from services.scheduler.core.job import Job
from services.scheduler.core.mlfq import MlfqPolicy, parse_mlfq_options
from services.scheduler.core.profile import SYNTHETIC_PROFILE, PerformanceProfile


class Policy(Protocol):
    name: str

    def add(self, job: Job, now: float) -> int:
        """Admits a job; returns the queue level it joins (0 is the highest priority)."""
        ...

    def remove(self, job: Job) -> None:
        """Forgets a finished or cancelled job."""
        ...

    def order(self, now: float) -> list[Job]:
        """Every admitted job, highest priority first."""
        ...

    def on_iteration(self, ran: Sequence[tuple[Job, int]], elapsed_s: float, now: float) -> None:
        """Accounts an iteration that ran `ran` ((job, tokens of its chunk)) in `elapsed_s`."""
        ...

    def level(self, job: Job) -> int:
        """The job's current queue level."""
        ...


class FcfsPolicy:
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

    def on_iteration(self, ran: Sequence[tuple[Job, int]], elapsed_s: float, now: float) -> None:
        pass

    def level(self, job: Job) -> int:
        return 0


class SrptOraclePolicy:
    """Shortest remaining processing time, knowing each job's output length (max_tokens, sent
    with ignore_eos by the benchmark). Unrealisable in production: a bound for benchmarks."""

    name = "srpt-oracle"

    def __init__(self, profile: PerformanceProfile) -> None:
        self._profile = profile
        self._jobs: dict[str, Job] = {}

    def remaining_s(self, job: Job) -> float:
        num_prefill = max(job.num_prompt_tokens - job.num_computed_tokens, 0)
        prefill = self._profile.prefill_time(num_prefill) if num_prefill else 0.0
        return prefill + (job.max_tokens - job.num_output_tokens) * self._profile.decode_time(1)

    def add(self, job: Job, now: float) -> int:
        self._jobs[job.job_id] = job
        return 0

    def remove(self, job: Job) -> None:
        self._jobs.pop(job.job_id, None)

    def order(self, now: float) -> list[Job]:
        return sorted(self._jobs.values(), key=self.remaining_s)  # stable: ties by arrival

    def on_iteration(self, ran: Sequence[tuple[Job, int]], elapsed_s: float, now: float) -> None:
        pass

    def level(self, job: Job) -> int:
        return 0


POLICY_NAMES = ("skip-join-mlfq", "mlfq", "fcfs", "srpt-oracle")


def make_policy(
    name: str,
    options: Mapping[str, str] | None = None,
    profile: PerformanceProfile | None = None,
    *,
    max_model_len: int = 2048,
    max_batch_size: int = 16,
) -> Policy:
    """Builds a policy by name; `options` are `--policy-option key=value` pairs."""
    options = dict(options or {})
    profile = profile or SYNTHETIC_PROFILE
    if name in ("skip-join-mlfq", "mlfq"):
        parsed = parse_mlfq_options(
            options,
            profile,
            max_model_len=max_model_len,
            max_batch_size=max_batch_size,
            skip_join=name == "skip-join-mlfq",
        )
        return MlfqPolicy(parsed, profile, name, batch_size=max_batch_size)
    if options:
        raise ValueError(f"policy {name!r} takes no options, got {sorted(options)}")
    if name == "fcfs":
        return FcfsPolicy()
    if name == "srpt-oracle":
        return SrptOraclePolicy(profile)
    raise ValueError(f"unknown policy {name!r}; choose from {list(POLICY_NAMES)}")
