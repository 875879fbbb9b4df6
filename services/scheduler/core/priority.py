"""Priority classes: a job of a higher class (a smaller number, 0 first) always runs before a
job of a lower one, and preempts it at the next token.

The policy orders jobs as it always does; the classes are applied on top of its order, so the
policy (skip-join MLFQ, fcfs, ...) still orders the jobs within each class, starvation
promotion included. What the classes change:
- the order: class first, then the policy's order (`by_class`, a stable sort), so a job of a
  higher class that arrives goes ahead of every running job of a lower class and takes its
  place in the next batch;
- whose KV goes when blocks run short: jobs of lower classes first, then the policy's choice
  (`by_class_enst`: ENST offset by class);
- an arrival may drop the KV of lower-class jobs to start at once (KvMemory.make_room spares
  only its own class, whose jobs would otherwise thrash).

With one class (every job's priority 0), all of this is the identity: behaviour is the
policy's alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from services.scheduler.core.job import Job


def by_class(order: Sequence[Job]) -> list[Job]:
    """`order` with the jobs of higher classes first, each class keeping the policy's order."""
    return sorted(order, key=lambda job: job.priority)


def by_class_enst(jobs: Sequence[Job], enst: Mapping[str, float]) -> dict[str, float]:
    """ENST values (only their order is used) that put every job of a lower class after every
    job of a higher one, and keep the policy's values' order within a class."""
    finite = [value for value in enst.values() if value != float("inf")]
    span = max(finite, default=0.0) + 1.0
    return {job.job_id: job.priority * span + min(enst[job.job_id], span - 0.5) for job in jobs}


def is_lower_class(job: Job, than: Job) -> bool:
    return job.priority > than.priority
