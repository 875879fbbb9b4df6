"""The Policy protocol: the order in which jobs get a place in the next batch.

A policy orders jobs; SchedulerCore turns the order into a batch under the batch-size, token
and KV-block limits. Re-forming the batch from this order at every iteration is what makes
preemption token-level: a job that drops out of the prefix that fits is preempted.

Besides the order, the core asks a policy three things: a job's queue level (for QUEUED events
and the per-level queue depth), each job's estimated next scheduled time (ENST, which decides
whose KV to swap out first and whom to prefetch), and whether a job is starving (a starving
arrival may take blocks from others). A policy that only orders jobs subclasses Policy and
inherits the defaults: one level, ENST by rank in the order, no starvation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.scheduler.core.job import Job


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
        return None

    @property
    def num_levels(self) -> int:
        """Queue levels, level 0 first (1 for a policy without levels)."""
        return 1

    def level(self, job: Job) -> int:
        """The job's current queue level."""
        return 0

    def enst(self, jobs: Sequence[Job], now: float) -> dict[str, float]:
        """Estimated time until each job of `jobs` (the policy's order) is next scheduled.
        Only the order of the values is used; by default, the job's rank."""
        return {job.job_id: float(rank) for rank, job in enumerate(jobs)}

    def is_starving(self, job: Job, now: float) -> bool:
        """Whether the policy promotes `job` for starvation now."""
        return False
