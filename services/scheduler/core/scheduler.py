"""SchedulerCore: admit jobs, decide each iteration, apply its results.

    core.add_job(job)              -> events (QUEUED, or REJECTED)
    decision = core.schedule()     -> the batch, frees, preemptions
    core.update(decision, tokens)  -> events (TOKENS, FINISHED)

With S pipeline stages the engine keeps up to S decisions in flight: schedule() may be called
again before the previous decision's update(). A job in a decision not yet updated is busy: it
is neither scheduled again (its next token is not known) nor evicted (a stage may still be
writing its KV) until its update() comes back.

Batch formation walks the policy's order and gives each job as many of its uncomputed tokens as
the token budget allows (chunked prefill; a decoding job needs one). When KV blocks run short, a
job may take blocks from jobs of lower priority by preempting them with recompute: their blocks
are freed and their tokens are re-prefilled when they run again, so nothing deadlocks and nothing
is lost. A job never evicts a job ahead of it, and a job with nothing computed yet waits for free
blocks rather than drop others' KV, unless it is starving or nothing else could run (else MLFQ
thrashes: see KvMemory.make_room).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from services.scheduler.core.block_manager import num_blocks_for
from services.scheduler.core.decision import (
    Decision,
    Event,
    EventKind,
    ScheduledChunk,
    SwapResult,
)
from services.scheduler.core.job import FinishReason, Job, JobStatus, KvState
from services.scheduler.core.kv_planner import KV_POLICIES, SwapCostModel
from services.scheduler.core.memory import KvMemory, Plan
from services.scheduler.core.policy import Policy, make_policy
from services.scheduler.core.profile import SYNTHETIC_PROFILE, PerformanceProfile


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
    # What happens to the KV of a job whose blocks are needed: "recompute" drops it (vLLM);
    # "reactive" swaps it to the kvstore and back when a batch needs it; "proactive" also
    # swaps out ahead of need to keep `reserve_blocks` free, and prefetches the jobs expected
    # to run soonest (smallest ENST). Swapping needs a kvstore (swap_enabled).
    kv_policy: str = "recompute"
    swap_enabled: bool = False
    reserve_blocks: int = 0  # free blocks proactive management keeps for new arrivals
    block_bytes: int = 0  # bytes of one block on one stage (for swap costs)
    swap_cost_scale: float = 1.0  # 0: always swap rather than recompute (tests, benchmarks)

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_model_len", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_batched_tokens < self.max_batch_size:
            raise ValueError("max_batched_tokens must be >= max_batch_size")
        if self.kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {KV_POLICIES}")
        if not 0 <= self.reserve_blocks < self.num_blocks:
            raise ValueError("reserve_blocks must be in [0, num_blocks)")

    @property
    def swaps(self) -> bool:
        return self.swap_enabled and self.kv_policy != "recompute"


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
    num_swapped_out_jobs: int  # swap-outs started since start
    num_swapped_in_jobs: int  # swap-ins completed since start
    num_swap_failures: int  # swaps the kvstore refused or lost (jobs recomputed)
    num_swaps_in_flight: int
    num_host_jobs: int  # jobs whose KV is in the kvstore now
    swap_bytes_per_s: float  # current bandwidth estimate
    num_preempted_jobs: int  # jobs that ran before and are not running now
    num_preemptions: int  # running jobs that dropped out of the batch, since start
    # Waiting jobs (not running) per policy queue level, level 0 first; one entry per level
    # of an MLFQ policy, one for FCFS, so an empty level reads 0 rather than disappearing.
    num_jobs_per_level: tuple[int, ...]


class SchedulerCore:
    def __init__(
        self,
        config: SchedulerConfig,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
        profile: PerformanceProfile | None = None,
    ) -> None:
        self.config = config
        self.policy = policy or make_policy(
            config.policy, max_model_len=config.max_model_len, max_batch_size=config.max_batch_size
        )
        self.memory = KvMemory(
            config,
            SwapCostModel(
                profile or SYNTHETIC_PROFILE, config.block_bytes, scale=config.swap_cost_scale
            ),
        )
        self.blocks = self.memory.blocks
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._running_ids: list[str] = []  # jobs running: in flight or in the last batch
        # Decisions sent but not yet updated: iteration id -> (when made, its jobs).
        self._in_flight: dict[int, tuple[float, list[str]]] = {}
        self._num_iterations = 0
        self._num_submitted = 0
        self._num_finished = 0
        self._num_cancelled = 0
        self._num_rejected = 0
        self._num_preemptions = 0

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
        """Forgets every job's device KV (a worker lost it); jobs re-prefill when they run.
        KV already in the kvstore stays there and is swapped back in as usual."""
        self.memory.recompute_all(list(self._jobs.values()))
        self._in_flight.clear()  # their results will never come

    # -- one iteration ---------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._jobs) or bool(self.memory.pending_free)

    @property
    def num_swaps_in_flight(self) -> int:
        return len(self.memory.swaps_in_flight)

    @property
    def num_in_flight(self) -> int:
        """Decisions scheduled and not yet updated."""
        return len(self._in_flight)

    def busy_job_ids(self) -> set[str]:
        return {job_id for _, job_ids in self._in_flight.values() for job_id in job_ids}

    def schedule(self) -> Decision:
        now = self._clock()
        plan = Plan(
            self.policy.order(now),
            budget=self.config.max_batched_tokens,
            policy=self.policy,
            now=now,
        )
        busy = self.busy_job_ids()
        plan.scheduled |= busy  # never evicted while a stage may still touch their KV
        memory = self.memory
        self._form_batch(plan)
        if plan.blocked and not (plan.chunks or busy or plan.swap_in or memory.swaps_in_flight):
            # Nothing can run while arrivals spare the others' KV (see KvMemory.make_room):
            # then they may drop it after all, so nothing deadlocks.
            plan.protect_progress = False
            plan.blocked = []
            plan.short_of_blocks = False
            self._form_batch(plan)
        if self.config.swaps and self.config.kv_policy == "proactive":
            memory.keep_reserve(plan)
            memory.prefetch(plan)
        self._num_iterations += 1
        decision = Decision(
            iteration_id=self._num_iterations,
            chunks=plan.chunks,
            free_job_ids=memory.take_pending_free(),
            events=self._transition_events([chunk.job_id for chunk in plan.chunks], busy),
            blocked_job_ids=plan.blocked,
            swap_out=plan.swap_out,
            swap_in=plan.swap_in,
        )
        scheduled_ids = [chunk.job_id for chunk in plan.chunks]
        self._running_ids = [*busy, *scheduled_ids]
        if scheduled_ids:
            self._in_flight[decision.iteration_id] = (now, scheduled_ids)
        return decision

    def update(
        self,
        decision: Decision,
        sampled: Mapping[str, int],
        swaps_done: Sequence[SwapResult] = (),
    ) -> list[Event]:
        """Applies an iteration's results: `sampled` maps job id to its new token;
        `swaps_done` are background swaps the worker finished meanwhile."""
        now = self._clock()
        for result in swaps_done:
            self.memory.apply_swap_result(result, self._jobs.get(result.job_id))
        scheduled_at, _ = self._in_flight.pop(decision.iteration_id, (now, []))
        elapsed = now - scheduled_at
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
        running = set(self._running_ids)
        levels = [self.policy.level(j) for j in self._jobs.values() if j.job_id not in running]
        quanta: Sequence[float] = getattr(self.policy, "quanta", ())  # MLFQ levels
        num_jobs_per_level = [0] * max(len(quanta), 1, *(level + 1 for level in levels))
        for level in levels:
            num_jobs_per_level[level] += 1
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
            num_recomputed_jobs=self.memory.num_recomputed,
            num_swapped_out_jobs=self.memory.num_swapped_out,
            num_swapped_in_jobs=self.memory.num_swapped_in,
            num_swap_failures=self.memory.num_swap_failures,
            num_swaps_in_flight=len(self.memory.swaps_in_flight),
            num_host_jobs=sum(1 for j in self._jobs.values() if j.kv_state is KvState.HOST),
            swap_bytes_per_s=self.memory.costs.bytes_per_s,
            num_preempted_jobs=sum(
                1 for j in self._jobs.values() if j.status is JobStatus.PREEMPTED
            ),
            num_preemptions=self._num_preemptions,
            num_jobs_per_level=tuple(num_jobs_per_level),
        )

    # -- internals -------------------------------------------------------------------------

    def _form_batch(self, plan: Plan) -> None:
        """Walks the policy's order, adding chunks to `plan` while they fit."""
        memory = self.memory
        for job in plan.order:
            if len(plan.chunks) == self.config.max_batch_size or plan.budget == 0:
                break
            if job.job_id in plan.scheduled:
                continue  # in this batch already, or its earlier token is still in flight
            if not job.kv_state.is_runnable:
                if job.kv_state is KvState.HOST and self.config.swaps:
                    memory.swap_in_if_room(job, plan)  # needed now: bring it back
                plan.blocked.append(job.job_id)
                plan.short_of_blocks |= job.kv_state is KvState.HOST
                if self.config.backfill:
                    continue
                break
            num_new = min(job.num_uncomputed_tokens, plan.budget)
            if not memory.make_room(job, self.blocks.num_new_blocks(job, num_new), plan):
                plan.blocked.append(job.job_id)
                plan.short_of_blocks = True
                if self.config.backfill:
                    continue  # backfill: jobs behind it may still fit
                break
            self._add_chunk(job, num_new, plan)

    def _add_chunk(self, job: Job, num_new: int, plan: Plan) -> None:
        self.blocks.allocate(job, num_new)
        job.kv_state = KvState.DEVICE
        start = job.num_computed_tokens
        plan.chunks.append(
            ScheduledChunk(
                job_id=job.job_id,
                token_ids=job.token_slice(start, start + num_new),
                start_pos=start,
                block_ids=list(job.block_ids),
                sample=start + num_new == job.num_tokens,
                sampling=job.sampling,
            )
        )
        plan.scheduled.add(job.job_id)
        plan.budget -= num_new

    def _transition_events(self, scheduled_ids: list[str], busy: set[str]) -> list[Event]:
        scheduled = set(scheduled_ids)
        events = []
        for job_id in self._running_ids:
            job = self._jobs.get(job_id)
            if job is not None and job_id not in scheduled and job_id not in busy:
                job.status = JobStatus.PREEMPTED
                self._num_preemptions += 1
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
        self.memory.release(job)
        self.policy.remove(job)
        del self._jobs[job.job_id]
