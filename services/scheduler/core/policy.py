"""Scheduling policies: the order in which jobs get a place in the next batch.

A policy only orders jobs; SchedulerCore turns the order into a batch under the batch-size,
token and KV-block limits. Re-forming the batch from this order at every iteration is what makes
preemption token-level: a job that drops out of the prefix that fits is preempted.
"""

from __future__ import annotations

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

    def charge(self, job: Job, service_s: float, now: float) -> None:
        """Accounts `service_s` seconds of execution to a job that ran in the last iteration."""
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

    def charge(self, job: Job, service_s: float, now: float) -> None:
        pass

    def level(self, job: Job) -> int:
        return 0


POLICIES = {FcfsPolicy.name: FcfsPolicy}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}") from None
