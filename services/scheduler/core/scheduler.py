"""SchedulerCore: admit jobs, decide each iteration, apply its results.

    core = SchedulerCore(config, policy)
    core.add_job(job)                                 -> events (QUEUED, or REJECTED)
    decision = core.schedule()                        -> the batch, frees, swaps, preemptions
    core.update(decision, tokens, logprobs=logprobs)  -> events (TOKENS, FINISHED), whole

With S pipeline stages the engine keeps up to S decisions in flight: schedule() may be called
again before the previous decision's update(). A job in a decision not yet updated is busy: it
is neither scheduled again (its next token is not known) nor evicted (a stage may still be
writing its KV) until its update() comes back.

Batch formation walks the policy's order, higher priority classes first (core/priority.py),
and gives each job as many of its uncomputed tokens as
the token budget allows (chunked prefill; a decoding job needs one). When KV blocks run short, a
job may take blocks from jobs of lower priority by preempting them: their KV is swapped out to
the kvstore, or dropped and re-prefilled when they run again (KvMemory), so nothing deadlocks
and nothing is lost. A job never evicts a job ahead of it, and a job with nothing computed yet
waits for free blocks rather than drop others' KV, unless it is starving or nothing else could
run (else MLFQ thrashes: see KvMemory.make_room).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from services.common.sampling import TokenLogprobs
from services.scheduler.core.block_manager import num_blocks_for
from services.scheduler.core.config import SchedulerConfig
from services.scheduler.core.decision import (
    Decision,
    Event,
    EventKind,
    ScheduledChunk,
    SwapResult,
)
from services.scheduler.core.job import FinishReason, Job, JobStatus, KvState
from services.scheduler.core.memory import KvMemory
from services.scheduler.core.plan import Plan
from services.scheduler.core.policy import Policy
from services.scheduler.core.priority import by_class
from services.scheduler.core.profile import SYNTHETIC_PROFILE, PerformanceProfile
from services.scheduler.core.stats import Counters, IterationWindow, SchedulerStats
from services.scheduler.core.swap_cost import SwapCostModel


class AdmissionError(ValueError):
    """A job that can never run; the message names the offending field."""


@dataclass(frozen=True, slots=True)
class _InFlight:
    decision: Decision
    scheduled_at: float


class SchedulerCore:
    def __init__(
        self,
        config: SchedulerConfig,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.monotonic,
        profile: PerformanceProfile | None = None,
    ) -> None:
        """`profile` is the engine's measured speed, for swap-versus-recompute costs."""
        self.config = config
        self.policy = policy
        self.counters = Counters()
        self.memory = KvMemory(
            config,
            SwapCostModel(
                profile or SYNTHETIC_PROFILE, config.block_bytes, scale=config.swap_cost_scale
            ),
            self.counters,
        )
        self.blocks = self.memory.blocks
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._running_ids: list[str] = []  # jobs running: in flight or in the last batch
        # Decisions made and not yet updated, oldest first: the one in-flight ledger.
        self._in_flight: dict[int, _InFlight] = {}
        self._window = IterationWindow()
        self._num_classes = 1  # priority classes seen so far (1 + the largest number)
        self._last_update_at = float("-inf")

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
        self.counters.num_submitted_jobs += 1
        if job.job_id in self._jobs:
            self.counters.num_rejected_jobs += 1
            return [_event(job, EventKind.REJECTED, error="job_id: already in use")]
        try:
            self.check_admissible(job)
        except AdmissionError as exc:
            self.counters.num_rejected_jobs += 1
            return [_event(job, EventKind.REJECTED, error=str(exc))]
        job.arrival_time = self._clock()
        # An estimate for skip-join (what it will find in the cache when it first runs).
        prefix = self.blocks.cached_prefix(job)
        num_host = len(self.memory.host_prefix(job, len(prefix)))
        job.num_cached_tokens = (len(prefix) + num_host) * self.config.block_size
        self._jobs[job.job_id] = job
        self._num_classes = max(self._num_classes, job.priority + 1)
        level = self.policy.add(job, job.arrival_time)
        return [_event(job, EventKind.QUEUED, queue_level=level)]

    def cancel(self, job_id: str) -> list[Event]:
        job = self._jobs.get(job_id)
        if job is None:
            return []
        self.counters.num_cancelled_jobs += 1
        self._finish(job, FinishReason.CANCELLED)
        return [_event(job, EventKind.FINISHED, finish_reason=FinishReason.CANCELLED)]

    def abort_all(self) -> list[Event]:
        events = []
        for job in list(self._jobs.values()):
            self._finish(job, FinishReason.ABORTED)
            events.append(_event(job, EventKind.FINISHED, finish_reason=FinishReason.ABORTED))
        return events

    def recompute_all(self) -> None:
        """Forgets every job's device KV (a worker lost it); jobs re-prefill when they run.
        KV already in the kvstore stays there and is swapped back in as usual."""
        self.memory.recompute_all(list(self._jobs.values()))
        self._in_flight.clear()  # their results will never come

    # -- one iteration ---------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._jobs) or self.memory.has_pending_free

    @property
    def num_swaps_in_flight(self) -> int:
        return len(self.memory.swaps_in_flight)

    @property
    def num_in_flight(self) -> int:
        """Decisions scheduled and not yet updated."""
        return len(self._in_flight)

    def oldest_in_flight(self) -> Decision:
        """The decision whose results come back next (results come back in order)."""
        return next(iter(self._in_flight.values())).decision

    def busy_job_ids(self) -> set[str]:
        return {
            chunk.job_id for entry in self._in_flight.values() for chunk in entry.decision.chunks
        }

    def schedule(self) -> Decision:
        """The next iteration. Every decision that is not empty is in flight until its results
        come back through update(), in order."""
        now = self._clock()
        plan = Plan(
            by_class(self.policy.order(now)),
            self.policy,
            now=now,
            budget=self.config.max_batched_tokens,
        )
        busy = self.busy_job_ids()
        plan.scheduled |= busy  # never evicted while a stage may still touch their KV
        if self.config.async_decode:
            plan.pending = self._pending_decodes()
        memory = self.memory
        self._form_batch(plan)
        if plan.blocked and not (plan.chunks or busy or plan.swap_in or memory.swaps_in_flight):
            # Nothing can run while arrivals spare the others' KV (see KvMemory.make_room):
            # then they may drop it after all, so nothing deadlocks.
            plan.protect_progress = False
            plan.blocked = []
            plan.short_of_blocks = False
            self._form_batch(plan)
        if self.config.proactive:
            memory.keep_reserve(plan)
            memory.prefetch(plan)
        memory.spill_evicted(plan)  # cached blocks this plan reuses: to the kvstore first
        self.counters.num_iterations += 1
        scheduled_ids = [chunk.job_id for chunk in plan.chunks]
        decision = Decision(
            iteration_id=self.counters.num_iterations,
            chunks=plan.chunks,
            free_job_ids=memory.take_pending_free(),
            events=self._transition_events(scheduled_ids, busy),
            blocked_job_ids=plan.blocked,
            swap_out=plan.swap_out,
            swap_in=plan.swap_in,
        )
        self._running_ids = list(dict.fromkeys([*busy, *scheduled_ids]))
        if not decision.is_empty:
            self._in_flight[decision.iteration_id] = _InFlight(decision, now)
        return decision

    def update(
        self,
        decision: Decision,
        tokens: Mapping[str, int],
        swaps_done: Sequence[SwapResult] = (),
        *,
        logprobs: Mapping[str, TokenLogprobs] | None = None,
    ) -> list[Event]:
        """Applies an iteration's results: `tokens` maps job id to its new token, `logprobs`
        its log-probabilities for jobs that asked; `swaps_done` are background swaps the
        workers finished meanwhile."""
        now = self._clock()
        self.apply_swaps(swaps_done)
        entry = self._in_flight.pop(decision.iteration_id, None)
        # The time this iteration held the workers: from when it was scheduled, or from the
        # previous iteration's results if later (with several decisions in flight, pipeline
        # stages or async decoding, it queued behind that one until then).
        elapsed = now - max(entry.scheduled_at, self._last_update_at) if entry is not None else 0.0
        self._last_update_at = now
        ran = [
            (job, len(chunk.token_ids))
            for chunk in decision.chunks
            if (job := self._jobs.get(chunk.job_id)) is not None
        ]
        if ran:
            self.policy.on_iteration(ran, elapsed, now)
        if decision.chunks:
            self._window.add(elapsed, len(decision.chunks), decision.num_tokens)
        events: list[Event] = []
        for chunk in decision.chunks:
            job = self._jobs.get(chunk.job_id)
            if job is None or job.num_computed_tokens != chunk.start_pos:
                continue  # cancelled or recomputed meanwhile
            job.num_computed_tokens += len(chunk.token_ids)
            self.blocks.register(job)
            if not chunk.sample:
                continue
            token = tokens.get(job.job_id)
            if token is None:
                raise RuntimeError(f"worker returned no token for job {job.job_id}")
            job.output_token_ids.append(token)
            found = logprobs.get(job.job_id) if logprobs else None
            fields: dict[str, Any] = {
                "token_ids": [token],
                "num_cached_tokens": job.num_cached_tokens,
            }
            if found is not None:
                fields["logprobs"] = [found]
            reason = self._finish_reason(job, token)
            if reason is None:
                events.append(_event(job, EventKind.TOKENS, **fields))
            else:
                self.counters.num_finished_jobs += 1
                self._finish(job, reason)
                events.append(
                    _event(
                        job,
                        EventKind.FINISHED,
                        finish_reason=reason,
                        **fields,
                    )
                )
        return events

    def apply_swaps(self, swaps_done: Sequence[SwapResult]) -> None:
        """Background swaps the workers finished (also reported outside an iteration)."""
        for result in swaps_done:
            self.memory.apply_swap_result(result, self._jobs.get)

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
        num_jobs_per_level = [0] * max([self.policy.num_levels, *(level + 1 for level in levels)])
        for level in levels:
            num_jobs_per_level[level] += 1
        per_class = [[0, 0] for _ in range(self._num_classes)]  # [waiting, running] per class
        for job in self._jobs.values():
            per_class[job.priority][job.job_id in running] += 1
        mean_iteration_s, mean_batch_jobs, mean_batch_tokens = self._window.means()
        memory = self.memory
        return SchedulerStats(
            counters=replace(self.counters),
            num_waiting_jobs=len(self._jobs) - num_running,
            num_running_jobs=num_running,
            num_preempted_jobs=sum(
                1 for j in self._jobs.values() if j.status is JobStatus.PREEMPTED
            ),
            num_total_blocks=self.blocks.num_blocks,
            num_free_blocks=self.blocks.num_free_blocks,
            num_cached_blocks=self.blocks.num_cached_blocks,
            num_host_cached_blocks=memory.host.num_blocks,
            num_swaps_in_flight=len(memory.swaps_in_flight),
            num_host_jobs=sum(1 for j in self._jobs.values() if j.kv_state is KvState.HOST),
            swap_bytes_per_s=memory.costs.bytes_per_s,
            num_jobs_per_level=tuple(num_jobs_per_level),
            num_jobs_per_class=tuple((c, w, r) for c, (w, r) in enumerate(per_class)),
            mean_iteration_s=mean_iteration_s,
            mean_batch_jobs=mean_batch_jobs,
            mean_batch_tokens=mean_batch_tokens,
        )

    # -- internals -------------------------------------------------------------------------

    def _pending_decodes(self) -> dict[str, int]:
        """Async decoding: jobs whose next token the newest decision in flight samples, that
        will need another one after it, and that are in no other decision in flight (job id
        -> the position of that token)."""
        if not self._in_flight:
            return {}
        count: dict[str, int] = {}
        for entry in self._in_flight.values():
            for chunk in entry.decision.chunks:
                count[chunk.job_id] = count.get(chunk.job_id, 0) + 1
        newest = next(reversed(self._in_flight.values())).decision
        pending = {}
        for chunk in newest.chunks:
            job = self._jobs.get(chunk.job_id)
            position = chunk.start_pos + len(chunk.token_ids)  # of the token being sampled
            if (
                job is not None
                and chunk.sample
                and count[chunk.job_id] == 1
                and job.num_computed_tokens == chunk.start_pos
                and job.num_output_tokens + 1 < job.max_tokens
                and position + 1 < self.config.max_model_len
            ):
                pending[job.job_id] = position
        return pending

    def _add_pending(self, job: Job, plan: Plan) -> None:
        """Async decoding: `job` runs the token the decision in flight samples for it, unless a
        job ahead of it is short of blocks: then it sits this one out, so that once its token is
        back it is no longer busy and its KV can be taken (a job in flight never is)."""
        position = plan.pending.pop(job.job_id)
        if plan.short_of_blocks:
            return
        num_blocks = num_blocks_for(position + 1, self.config.block_size) - len(job.block_ids)
        if num_blocks > 0 and not self._make_room(job, num_blocks, [], plan):
            return  # it runs once its token is back, as any job
        self.blocks.allocate_blocks(job, max(num_blocks, 0))
        plan.chunks.append(
            ScheduledChunk(
                job_id=job.job_id,
                token_ids=[0],  # a placeholder: the worker runs the token it sampled
                start_pos=position,
                block_ids=list(job.block_ids),
                sample=True,
                sampling=None,
                from_last_sample=True,
            )
        )
        plan.budget -= 1

    def _form_batch(self, plan: Plan) -> None:
        """Walks the policy's order, adding chunks to `plan` while they fit."""
        memory = self.memory
        for job in plan.order:
            if len(plan.chunks) == self.config.max_batch_size or plan.budget == 0:
                break
            if job.job_id in plan.scheduled:
                if job.job_id in plan.pending:
                    self._add_pending(job, plan)
                continue  # in this batch already, or its earlier token is still in flight
            if not job.kv_state.is_runnable:
                if job.kv_state is KvState.HOST and self.config.swaps:
                    memory.swap_in_if_room(job, plan)  # needed now: bring it back
                plan.blocked.append(job.job_id)
                plan.short_of_blocks |= job.kv_state is KvState.HOST
                if self.config.backfill:
                    continue
                break
            prefix = self.blocks.cached_prefix(job)  # for a job with nothing computed
            names = memory.host_prefix(job, len(prefix))  # and what follows, in the kvstore
            if names and self._make_room(job, len(names), prefix, plan):
                memory.load_prefix(job, prefix, names, plan)
                plan.blocked.append(job.job_id)  # it runs once the blocks have landed
                if self.config.backfill:
                    continue
                break
            num_cached = len(prefix) * self.config.block_size
            num_new = min(job.num_uncomputed_tokens - num_cached, plan.budget)
            num_blocks = num_blocks_for(
                job.num_computed_tokens + num_cached + num_new, self.config.block_size
            )
            if not self._make_room(
                job, num_blocks - len(job.block_ids) - len(prefix), prefix, plan
            ):
                plan.blocked.append(job.job_id)
                plan.short_of_blocks = True
                if self.config.backfill:
                    continue  # backfill: jobs behind it may still fit
                break
            if self.config.prefix_caching and not job.block_ids:
                self._take_prefix(job, prefix)
            self._add_chunk(job, num_new, plan)

    def _make_room(self, job: Job, num_new_blocks: int, prefix: list[int], plan: Plan) -> bool:
        """Room for `num_new_blocks` and for the cached `prefix`: taking a cached block nobody
        holds uses up a free one, as a new block does, and evicting the jobs that held one
        makes it such a block."""
        while True:
            room = num_new_blocks + self.blocks.num_evictable(prefix)
            if self.blocks.num_free_blocks >= room:
                return True
            if not self.memory.make_room(job, room, plan):
                return False

    def _take_prefix(self, job: Job, prefix: list[int]) -> None:
        """A job starting from nothing begins with the cached blocks of its prefix."""
        self.memory.count_prefix(job, len(prefix))
        if prefix:
            self.blocks.share(job, prefix)
            job.num_computed_tokens = len(prefix) * self.config.block_size

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
                sampling=None if job.sampling_sent else job.sampling,
            )
        )
        job.sampling_sent = True
        plan.scheduled.add(job.job_id)
        plan.budget -= num_new

    def _transition_events(self, scheduled_ids: list[str], busy: set[str]) -> list[Event]:
        scheduled = set(scheduled_ids)
        events = []
        for job_id in self._running_ids:
            job = self._jobs.get(job_id)
            if job is not None and job_id not in scheduled and job_id not in busy:
                job.status = JobStatus.PREEMPTED
                self.counters.num_preemptions += 1
                events.append(_event(job, EventKind.PREEMPTED))
        for job_id in scheduled_ids:
            job = self._jobs[job_id]
            if job.status is JobStatus.PREEMPTED:
                events.append(_event(job, EventKind.RESUMED))
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


def _event(job: Job, kind: EventKind, **fields: Any) -> Event:
    return Event(job.job_id, kind, owner=job.owner, **fields)
