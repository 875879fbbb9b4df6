"""SchedulerCore: admit jobs, decide each iteration, apply its results.

    core.add_job(job)              -> events (QUEUED, or REJECTED)
    decision = core.schedule()     -> the batch, frees, preemptions
    core.update(decision, tokens)  -> events (TOKENS, FINISHED)

Batch formation walks the policy's order and gives each job as many of its uncomputed tokens as
the token budget allows (chunked prefill; a decoding job needs one). When KV blocks run short, a
job may take blocks from jobs of lower priority by preempting them with recompute: their blocks
are freed and their tokens are re-prefilled when they run again, so nothing deadlocks and nothing
is lost. A job never evicts a job ahead of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services.scheduler.core.block_manager import BlockManager, num_blocks_for
from services.scheduler.core.decision import Decision, Event, EventKind, ScheduledChunk
from services.scheduler.core.job import FinishReason, Job, JobStatus
from services.scheduler.core.policy import Policy, make_policy


class AdmissionError(ValueError):
    """A job that can never run; the message names the offending field."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    num_blocks: int  # device KV blocks per stage
    block_size: int  # tokens per block
    max_model_len: int  # longest prompt + output
    max_batch_size: int = 16  # jobs per iteration (the paper caps it at 16)
    max_batched_tokens: int = 2048  # tokens per iteration (prefill chunks + decodes)
    policy: str = "fcfs"
    # A job that cannot get KV blocks is skipped and lower-priority jobs fill the batch
    # (backfill); False stops batch formation at it, as the paper's code does.
    backfill: bool = True

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_model_len", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_batched_tokens < self.max_batch_size:
            raise ValueError("max_batched_tokens must be >= max_batch_size")


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_waiting_jobs: int
    num_running_jobs: int
    num_total_blocks: int
    num_free_blocks: int
    num_iterations: int
    num_submitted_jobs: int
    num_finished_jobs: int
    num_cancelled_jobs: int
    num_rejected_jobs: int
    num_recomputed_jobs: int


class SchedulerCore:
    def __init__(
        self,
        config: SchedulerConfig,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.policy = policy or make_policy(
            config.policy, max_model_len=config.max_model_len, max_batch_size=config.max_batch_size
        )
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._running_ids: list[str] = []  # the last decision's batch
        self._pending_free: list[str] = []  # jobs whose worker blocks must be released
        self._scheduled_at = 0.0  # when the last decision was made
        self._num_iterations = 0
        self._num_submitted = 0
        self._num_finished = 0
        self._num_cancelled = 0
        self._num_rejected = 0
        self._num_recomputed = 0

    # -- admission -------------------------------------------------------------------------

    def check_admissible(self, job: Job) -> None:
        """Raises AdmissionError when `job` could never run on this engine."""
        total = job.num_prompt_tokens + job.max_tokens
        if total > self.config.max_model_len:
            raise AdmissionError(
                f"max_tokens: prompt ({job.num_prompt_tokens} tokens) + max_tokens "
                f"({job.max_tokens}) exceeds the model's context of "
                f"{self.config.max_model_len} tokens"
            )
        if num_blocks_for(total, self.config.block_size) > self.config.num_blocks:
            raise AdmissionError(
                f"max_tokens: prompt + max_tokens needs {total} tokens of KV cache, "
                f"more than the {self.config.num_blocks * self.config.block_size} this engine has"
            )

    def add_job(self, job: Job) -> list[Event]:
        self._num_submitted += 1
        if job.job_id in self._jobs:
            self._num_rejected += 1
            return [Event(job.job_id, EventKind.REJECTED, error="job_id: already in use")]
        try:
            self.check_admissible(job)
        except AdmissionError as exc:
            self._num_rejected += 1
            return [Event(job.job_id, EventKind.REJECTED, error=str(exc))]
        job.arrival_time = self._clock()
        self._jobs[job.job_id] = job
        level = self.policy.add(job, job.arrival_time)
        return [Event(job.job_id, EventKind.QUEUED, queue_level=level)]

    def cancel(self, job_id: str) -> list[Event]:
        job = self._jobs.get(job_id)
        if job is None:
            return []
        self._num_cancelled += 1
        self._finish(job, FinishReason.CANCELLED)
        return [Event(job_id, EventKind.FINISHED, finish_reason=FinishReason.CANCELLED)]

    def abort_all(self) -> list[Event]:
        events = []
        for job in list(self._jobs.values()):
            self._finish(job, FinishReason.ABORTED)
            events.append(Event(job.job_id, EventKind.FINISHED, finish_reason=FinishReason.ABORTED))
        return events

    def recompute_all(self) -> None:
        """Forgets every job's device KV (a worker lost it); jobs re-prefill when they run."""
        for job in self._jobs.values():
            if job.block_ids:
                self._preempt_by_recompute(job)
        self._pending_free.clear()

    # -- one iteration ---------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._jobs) or bool(self._pending_free)

    def schedule(self) -> Decision:
        now = self._scheduled_at = self._clock()
        budget = self.config.max_batched_tokens
        order = self.policy.order(now)
        rank = {job.job_id: i for i, job in enumerate(order)}
        chunks: list[ScheduledChunk] = []
        blocked: list[str] = []
        scheduled: set[str] = set()
        for job in order:
            if len(chunks) == self.config.max_batch_size or budget == 0:
                break
            num_new = min(job.num_uncomputed_tokens, budget)
            if num_new == 0:
                continue
            if not self._make_room(job, num_new, order, rank, scheduled):
                blocked.append(job.job_id)
                if self.config.backfill:
                    continue  # backfill: jobs behind it may still fit
                break
            self.blocks.allocate(job, num_new)
            start = job.num_computed_tokens
            chunks.append(
                ScheduledChunk(
                    job_id=job.job_id,
                    token_ids=job.token_slice(start, start + num_new),
                    start_pos=start,
                    block_ids=list(job.block_ids),
                    sample=start + num_new == job.num_tokens,
                    sampling=job.sampling,
                )
            )
            scheduled.add(job.job_id)
            budget -= num_new
        self._num_iterations += 1
        decision = Decision(
            iteration_id=self._num_iterations,
            chunks=chunks,
            free_job_ids=self._pending_free,
            events=self._transition_events([chunk.job_id for chunk in chunks]),
            blocked_job_ids=blocked,
        )
        self._pending_free = []
        self._running_ids = [chunk.job_id for chunk in chunks]
        return decision

    def update(self, decision: Decision, sampled: Mapping[str, int]) -> list[Event]:
        """Applies an iteration's results: `sampled` maps job id to its new token."""
        now = self._clock()
        elapsed = now - self._scheduled_at
        events: list[Event] = []
        ran = [
            (job, len(chunk.token_ids))
            for chunk in decision.chunks
            if (job := self._jobs.get(chunk.job_id)) is not None
        ]
        if ran:
            self.policy.on_iteration(ran, elapsed, now)
        for chunk in decision.chunks:
            job = self._jobs.get(chunk.job_id)
            if job is None or job.num_computed_tokens != chunk.start_pos:
                continue  # cancelled or recomputed meanwhile
            job.num_computed_tokens += len(chunk.token_ids)
            if not chunk.sample:
                continue
            token = sampled.get(job.job_id)
            if token is None:
                raise RuntimeError(f"worker returned no token for job {job.job_id}")
            job.output_token_ids.append(token)
            reason = self._finish_reason(job, token)
            if reason is None:
                events.append(Event(job.job_id, EventKind.TOKENS, token_ids=[token]))
            else:
                self._num_finished += 1
                self._finish(job, reason)
                events.append(
                    Event(job.job_id, EventKind.FINISHED, token_ids=[token], finish_reason=reason)
                )
        return events

    # -- inspection ------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def job_ids(self) -> list[str]:
        return list(self._jobs)

    @property
    def num_jobs(self) -> int:
        return len(self._jobs)

    def stats(self) -> SchedulerStats:
        num_running = sum(1 for job_id in self._running_ids if job_id in self._jobs)
        return SchedulerStats(
            num_waiting_jobs=len(self._jobs) - num_running,
            num_running_jobs=num_running,
            num_total_blocks=self.blocks.num_blocks,
            num_free_blocks=self.blocks.num_free_blocks,
            num_iterations=self._num_iterations,
            num_submitted_jobs=self._num_submitted,
            num_finished_jobs=self._num_finished,
            num_cancelled_jobs=self._num_cancelled,
            num_rejected_jobs=self._num_rejected,
            num_recomputed_jobs=self._num_recomputed,
        )

    # -- internals -------------------------------------------------------------------------

    def _make_room(
        self, job: Job, num_new: int, order: list[Job], rank: dict[str, int], scheduled: set[str]
    ) -> bool:
        """Frees blocks of lower-priority jobs (recompute) until `job` fits; False if it can't."""
        while not self.blocks.can_allocate(job, num_new):
            victim = next(
                (
                    other
                    for other in reversed(order)
                    if rank[other.job_id] > rank[job.job_id]
                    and other.block_ids
                    and other.job_id not in scheduled
                ),
                None,
            )
            if victim is None:
                return False
            self._preempt_by_recompute(victim)
        return True

    def _preempt_by_recompute(self, job: Job) -> None:
        self.blocks.free(job)
        job.num_computed_tokens = 0
        job.num_preemptions += 1
        self._num_recomputed += 1
        self._pending_free.append(job.job_id)

    def _transition_events(self, scheduled_ids: list[str]) -> list[Event]:
        scheduled = set(scheduled_ids)
        events = []
        for job_id in self._running_ids:
            job = self._jobs.get(job_id)
            if job is not None and job_id not in scheduled:
                job.status = JobStatus.PREEMPTED
                events.append(Event(job_id, EventKind.PREEMPTED))
        for job_id in scheduled_ids:
            job = self._jobs[job_id]
            if job.status is JobStatus.PREEMPTED:
                events.append(Event(job_id, EventKind.RESUMED))
            job.status = JobStatus.RUNNING
        return events

    def _finish_reason(self, job: Job, token: int) -> FinishReason | None:
        if not job.ignore_eos and token in job.stop_token_ids:
            return FinishReason.STOP
        if job.num_output_tokens >= job.max_tokens or job.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, job: Job, reason: FinishReason) -> None:
        job.status = JobStatus.FINISHED
        job.finish_reason = reason
        if job.block_ids:
            self.blocks.free(job)
            self._pending_free.append(job.job_id)
        self.policy.remove(job)
        del self._jobs[job.job_id]
