"""Plan: the decision being built in one SchedulerCore.schedule() call."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.core.decision import BlockMove, ScheduledChunk
from services.scheduler.core.job import Job
from services.scheduler.core.policy import Policy
from services.scheduler.core.priority import by_class_enst


@dataclass(slots=True)
class Plan:
    order: list[Job]  # the policy's order this iteration
    policy: Policy  # for ENST and starvation
    now: float = 0.0
    budget: int = 0  # tokens left
    chunks: list[ScheduledChunk] = field(default_factory=list)
    scheduled: set[str] = field(default_factory=set)  # in this batch, or busy in an earlier one
    blocked: list[str] = field(default_factory=list)
    swap_out: list[BlockMove] = field(default_factory=list)
    swap_in: list[BlockMove] = field(default_factory=list)
    swapping_in: set[str] = field(default_factory=set)
    # A job could not get blocks this iteration: blocks freed from now on are its by right,
    # so no job behind it may swap in (else swap-ins of lower jobs can starve it forever).
    short_of_blocks: bool = False
    # Jobs with nothing computed wait for free blocks rather than drop others' KV; cleared
    # when that leaves nothing to run (see KvMemory.make_room).
    protect_progress: bool = True
    # Async decoding: jobs whose token at this position is being sampled in the decision in
    # flight; each may run that token in this plan (job id -> its position).
    pending: dict[str, int] = field(default_factory=dict)
    _ranks: dict[str, int] | None = None
    _enst: dict[str, float] | None = None

    def rank(self, job: Job) -> int:
        if self._ranks is None:
            self._ranks = {other.job_id: i for i, other in enumerate(self.order)}
        return self._ranks[job.job_id]

    def enst(self, job: Job) -> float:
        """Estimated time until the job is next scheduled (only the order of these values is
        used): the policy's, every lower priority class after the higher ones."""
        if self._enst is None:
            self._enst = by_class_enst(self.order, self.policy.enst(self.order, self.now))
        return self._enst[job.job_id]

    def is_starving(self, job: Job) -> bool:
        return self.policy.is_starving(job, self.now)
