"""The scheduler's busy loop, in its own thread: drain submits and cancels, schedule, run the
workers, update, publish one message per frontend per iteration.

With S pipeline stages up to S decisions are in flight: while stage 1 runs batch k, stage 0
already runs batch k + 1 (of other jobs). The loop sends a new decision whenever fewer than S
are in flight and the core has jobs to run, and otherwise waits for the oldest result.

gRPC handlers never touch the core: they post to the inbox and read from their outbox, so the
loop owns all job state without locks (STYLE 6).
"""

from __future__ import annotations

import logging
import os
import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from services.scheduler.core import (
    Decision,
    Event,
    EventKind,
    Job,
    SchedulerCore,
    TokenLogprobs,
)
from services.scheduler.pipeline import Pipeline
from services.scheduler.worker_link import WorkerError

log = logging.getLogger(__name__)

SEPARATOR = "/"  # internal job id = "<frontend id>/<frontend's job id>"
IDLE_WAIT_S = 0.05
WORKER_RETRY_S = 0.5
SWAP_POLL_S = 0.001
# Stats are a snapshot for Stats and /metrics: taking one walks every job, so a busy loop
# refreshes it at most this often (and always when it goes idle).
STATS_INTERVAL_S = 0.05


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Events for one frontend from one iteration (iteration_id 0: outside an iteration)."""

    iteration_id: int
    events: list[tuple[str, Event]]  # (frontend's job id, event)


@dataclass(frozen=True, slots=True)
class StageView:
    """One stage's totals, for Stats."""

    stage_index: int
    address: str
    first_layer: int
    num_layers: int
    num_used_blocks: int
    num_commands: int
    busy_s: float
    wait_s: float
    wall_s: float
    num_total_blocks: int = 0  # the stage's own KV pool, from its Info (0: not known yet)


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_waiting_jobs: int = 0
    num_running_jobs: int = 0
    num_total_blocks: int = 0
    num_free_blocks: int = 0
    num_iterations: int = 0
    num_submitted_jobs: int = 0
    num_finished_jobs: int = 0
    num_cancelled_jobs: int = 0
    num_rejected_jobs: int = 0
    num_recomputed_jobs: int = 0
    mean_iteration_ms: float = 0.0
    mean_forward_ms: float = 0.0
    mean_batch_jobs: float = 0.0  # over the last 1000 batches
    mean_batch_tokens: float = 0.0
    num_frontends: int = 0
    num_worker_used_blocks: int = 0
    num_swapped_out_jobs: int = 0
    num_swapped_in_jobs: int = 0
    num_swap_failures: int = 0
    num_host_jobs: int = 0
    swap_bytes_per_s: float = 0.0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    stages: tuple[StageView, ...] = field(default_factory=tuple)
    num_preempted_jobs: int = 0
    num_preemptions: int = 0
    num_jobs_per_level: tuple[int, ...] = ()  # waiting jobs per queue level, level 0 first


class Engine:
    def __init__(self, core: SchedulerCore, pipeline: Pipeline) -> None:
        self._core = core
        self._worker = pipeline
        self._in_flight: deque[tuple[Decision, float]] = deque()  # sent, not yet collected
        self._swap_bytes = {True: 0, False: 0}  # swap_in -> bytes moved
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._outboxes: dict[str, queue.SimpleQueue[Outgoing | None]] = {}
        self._outboxes_lock = threading.Lock()
        self._stop = threading.Event()
        self._iteration_s: deque[float] = deque(maxlen=1000)
        self._forward_s: deque[float] = deque(maxlen=1000)
        self._batch_jobs: deque[int] = deque(maxlen=1000)
        self._batch_tokens: deque[int] = deque(maxlen=1000)
        self._worker_used_blocks = 0
        self._stats = EngineStats()
        self._stats_at = 0.0  # time.perf_counter() of the last snapshot
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # -- called from gRPC threads ----------------------------------------------------------

    def start(self) -> None:
        self._worker.open()
        self._publish_stats()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._worker.close()

    def connect(self, frontend_id: str) -> queue.SimpleQueue[Outgoing | None]:
        outbox: queue.SimpleQueue[Outgoing | None] = queue.SimpleQueue()
        with self._outboxes_lock:
            self._outboxes[frontend_id] = outbox
        return outbox

    def disconnect(self, frontend_id: str) -> None:
        """The frontend's stream broke: cancel all its jobs."""
        with self._outboxes_lock:
            outbox = self._outboxes.pop(frontend_id, None)
        if outbox is not None:
            outbox.put(None)
            self._inbox.put(("disconnect", frontend_id))

    def submit(self, frontend_id: str, jobs: list[Job], rejected: list[tuple[str, str]]) -> None:
        """Admits jobs; `rejected` are (job id, error) pairs the edge could not even parse."""
        self._inbox.put(("submit", frontend_id, jobs, rejected))

    def cancel(self, frontend_id: str, job_ids: list[str]) -> None:
        self._inbox.put(("cancel", frontend_id, job_ids))

    @property
    def stats(self) -> EngineStats:
        return self._stats

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            # A bug in the loop must not leave a scheduler that answers health checks but
            # never runs an iteration: die loudly, so the supervisor (launcher, Kubernetes)
            # sees it and restarts or stops the stack.
            log.critical("engine loop crashed; exiting", exc_info=True)
            os._exit(70)

    def _loop(self) -> None:
        depth = self._worker.num_stages
        while not self._stop.is_set():
            self._drain_inbox(block=not self._core.has_work() and not self._in_flight)
            try:
                if len(self._in_flight) < depth and self._send_next():
                    continue  # room for another batch while the earlier ones run
                if self._in_flight:
                    self._complete_oldest()
            except WorkerError as exc:
                log.error("%s; re-prefilling every job once the workers are back", exc)
                self._recover_worker()
        for event in self._core.abort_all():
            self._publish(0, [event])

    def _send_next(self) -> bool:
        """Schedules and sends a decision; False when there was nothing worth sending."""
        started = time.perf_counter()
        decision = self._core.schedule()
        if decision.is_empty:
            self._publish(0, decision.events)
            if self._in_flight or not self._core.num_swaps_in_flight:
                return False
            time.sleep(SWAP_POLL_S)  # nothing runnable until a swap lands: poll for it
        self._worker.submit(decision)
        self._in_flight.append((decision, started))
        # A batch with jobs leaves room for the next one; a command that only frees or
        # swaps waits for its result, so an idle loop does not flood the stages.
        return bool(decision.chunks)

    def _complete_oldest(self) -> None:
        decision, started = self._in_flight[0]
        result = self._worker.collect()
        self._in_flight.popleft()
        for swap in result.swaps_done:
            if swap.ok:
                self._swap_bytes[swap.swap_in] += swap.num_bytes
        events = self._core.update(decision, result.tokens, result.swaps_done)
        if result.logprobs:  # the core passes tokens on; their logprobs ride along here
            events = [_with_logprobs(event, result.logprobs) for event in events]
        # Iteration = schedule + command round trip + update; forward is the workers' model
        # time, so the difference is everything the spine adds.
        self._iteration_s.append(time.perf_counter() - started)
        self._forward_s.append(result.forward_s)
        if decision.chunks:
            self._batch_jobs.append(len(decision.chunks))
            self._batch_tokens.append(sum(len(chunk.token_ids) for chunk in decision.chunks))
        self._worker_used_blocks = result.num_used_blocks
        # Stats before events: a caller that has its last token also sees its job counted.
        self._publish_stats(force=any(e.kind is EventKind.FINISHED for e in events))
        self._publish(decision.iteration_id, decision.events + events)

    def _drain_inbox(self, block: bool) -> None:
        if block:  # going idle: the snapshot must show where the last iteration left things
            self._publish_stats(force=True)
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        events: list[Event] = []
        while True:
            events.extend(self._apply(item))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._publish(0, events)
        self._publish_stats(force=True)

    def _apply(self, item: tuple) -> list[Event]:
        kind, frontend_id, *rest = item
        if kind == "submit":
            jobs, rejected = rest
            events = [
                Event(f"{frontend_id}{SEPARATOR}{job_id}", EventKind.REJECTED, error=error)
                for job_id, error in rejected
            ]
            for job in jobs:
                job.job_id = f"{frontend_id}{SEPARATOR}{job.job_id}"
                events.extend(self._core.add_job(job))
            return events
        if kind == "cancel":
            (job_ids,) = rest
            events = []
            for job_id in job_ids:
                events.extend(self._core.cancel(f"{frontend_id}{SEPARATOR}{job_id}"))
            return events
        if kind == "disconnect":
            prefix = f"{frontend_id}{SEPARATOR}"
            for job_id in self._core.job_ids():
                if job_id.startswith(prefix):
                    self._core.cancel(job_id)
            return []
        raise ValueError(f"unknown inbox item {kind!r}")

    def _publish(self, iteration_id: int, events: list[Event]) -> None:
        by_frontend: dict[str, list[tuple[str, Event]]] = {}
        for event in events:
            frontend_id, _, job_id = event.job_id.partition(SEPARATOR)
            by_frontend.setdefault(frontend_id, []).append((job_id, event))
        with self._outboxes_lock:
            for frontend_id, items in by_frontend.items():
                outbox = self._outboxes.get(frontend_id)
                if outbox is not None:
                    outbox.put(Outgoing(iteration_id, items))

    def _publish_stats(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._stats_at < STATS_INTERVAL_S:
            return
        self._stats_at = now
        core = self._core.stats()
        with self._outboxes_lock:
            num_frontends = len(self._outboxes)
        self._stats = EngineStats(
            num_waiting_jobs=core.num_waiting_jobs,
            num_running_jobs=core.num_running_jobs,
            num_total_blocks=core.num_total_blocks,
            num_free_blocks=core.num_free_blocks,
            num_iterations=core.num_iterations,
            num_submitted_jobs=core.num_submitted_jobs,
            num_finished_jobs=core.num_finished_jobs,
            num_cancelled_jobs=core.num_cancelled_jobs,
            num_rejected_jobs=core.num_rejected_jobs,
            num_recomputed_jobs=core.num_recomputed_jobs,
            mean_iteration_ms=_mean_ms(self._iteration_s),
            mean_forward_ms=_mean_ms(self._forward_s),
            mean_batch_jobs=statistics.fmean(self._batch_jobs) if self._batch_jobs else 0.0,
            mean_batch_tokens=statistics.fmean(self._batch_tokens) if self._batch_tokens else 0.0,
            num_frontends=num_frontends,
            num_worker_used_blocks=self._worker_used_blocks,
            num_swapped_out_jobs=core.num_swapped_out_jobs,
            num_swapped_in_jobs=core.num_swapped_in_jobs,
            num_swap_failures=core.num_swap_failures,
            num_host_jobs=core.num_host_jobs,
            swap_bytes_per_s=core.swap_bytes_per_s,
            swap_out_bytes=self._swap_bytes[False],
            swap_in_bytes=self._swap_bytes[True],
            stages=self._stage_views(),
            num_preempted_jobs=core.num_preempted_jobs,
            num_preemptions=core.num_preemptions,
            num_jobs_per_level=core.num_jobs_per_level,
        )

    def _stage_views(self) -> tuple[StageView, ...]:
        now = time.perf_counter()
        views = []
        for index, tally in enumerate(self._worker.tallies):
            info = self._worker.stages[index] if index < len(self._worker.stages) else None
            views.append(
                StageView(
                    stage_index=index,
                    address=self._worker.links[index].address,
                    first_layer=info.first_layer if info else 0,
                    num_layers=info.num_layers if info else 0,
                    num_used_blocks=tally.num_used_blocks,
                    num_commands=tally.num_commands,
                    busy_s=tally.busy_s,
                    wait_s=tally.wait_s,
                    wall_s=now - tally.first_command_at if tally.first_command_at else 0.0,
                    num_total_blocks=info.num_blocks if info else 0,
                )
            )
        return tuple(views)

    def _recover_worker(self) -> None:
        """A stage lost its KV (crash, restart) or the pipeline broke: reconnect every stage
        (a new activation group), then recompute every job. Callers see a delay."""
        self._in_flight.clear()
        while not self._stop.is_set():
            try:
                self._worker.open()
                break
            except WorkerError as exc:
                log.info("waiting for the workers: %s", exc)
                time.sleep(WORKER_RETRY_S)
        self._core.recompute_all()


def _with_logprobs(event: Event, logprobs: dict[str, TokenLogprobs]) -> Event:
    found = logprobs.get(event.job_id) if event.token_ids else None
    return replace(event, logprobs=[found]) if found is not None else event


def _mean_ms(samples: deque[float]) -> float:
    return 1000 * sum(samples) / len(samples) if samples else 0.0
