"""The scheduler's busy loop, in its own thread: drain submits and cancels, schedule, run the
workers, update, publish one message per frontend per iteration.

With S pipeline stages up to S decisions are in flight: while stage 1 runs batch k, stage 0
already runs batch k + 1 (of other jobs). The loop sends a new decision whenever fewer than S
are in flight and the core has jobs to run, and otherwise waits for the oldest result. The
core's ledger is the only record of what is in flight.

gRPC handlers never touch the core: they post typed messages to the inbox and read from their
outbox, so the loop owns all job state without locks (docs/design.md, section 13).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from services.scheduler.core import (
    Decision,
    Event,
    EventKind,
    SchedulerCore,
)
from services.scheduler.engine_stats import EngineStats, StageView
from services.scheduler.inbox import Cancel, Disconnect, InboxMessage, Submit
from services.scheduler.pipeline import Pipeline, StepResult
from services.scheduler.worker_link import WorkerError

# Why a job submitted while the scheduler drains is refused (with Event.retry).
SHUTTING_DOWN = "scheduler: shutting down; retry the request"

log = logging.getLogger(__name__)

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
    events: list[Event]


class Engine:
    def __init__(self, core: SchedulerCore, pipeline: Pipeline) -> None:
        self._core = core
        self._worker = pipeline
        self._swap_bytes = {True: 0, False: 0}  # swap_in -> bytes moved
        self._inbox: queue.SimpleQueue[InboxMessage] = queue.SimpleQueue()
        self._outboxes: dict[str, queue.SimpleQueue[Outgoing | None]] = {}
        self._outboxes_lock = threading.Lock()
        self._stop = threading.Event()
        self._forward_s: deque[float] = deque(maxlen=1000)
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
            self._inbox.put(Disconnect(frontend_id))

    def post(self, message: InboxMessage) -> None:
        """Hands a frontend's submits or cancels to the loop."""
        self._inbox.put(message)

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
        # Decisions in flight: one per stage; async decoding sends the next while one runs.
        depth = self._worker.num_stages + (1 if self._core.config.async_decode else 0)
        core = self._core
        while not self._stop.is_set():
            self._drain_inbox(block=not core.has_work() and not core.num_in_flight)
            try:
                if core.num_in_flight < depth and self._send_next():
                    continue  # room for another batch while the earlier ones run
                if core.num_in_flight:
                    self._complete_oldest()
            except WorkerError as exc:
                log.error("%s; re-prefilling every job once the workers are back", exc)
                self._recover_worker()
        self._publish(0, core.abort_all())

    def _send_next(self) -> bool:
        """Schedules and sends a decision; False when there was nothing worth sending."""
        core = self._core
        decision = core.schedule()
        if not decision.is_empty:
            self._worker.submit(decision)
            # A batch with jobs leaves room for the next one; a command that only frees or
            # swaps waits for its result, so an idle loop does not flood the stages.
            return bool(decision.chunks)
        self._publish(0, decision.events)
        if core.num_in_flight or not core.num_swaps_in_flight:
            return False
        time.sleep(SWAP_POLL_S)  # nothing runnable until a swap lands: poll for it
        result = self._worker.execute(decision)  # an empty command, answered at once
        self._publish(0, self._apply(decision, result))
        return False

    def _complete_oldest(self) -> None:
        decision = self._core.oldest_in_flight()
        events = self._apply(decision, self._worker.collect())
        self._publish(decision.iteration_id, decision.events + events)

    def _apply(self, decision: Decision, result: StepResult) -> list[Event]:
        for swap in result.swaps_done:
            if swap.ok:
                self._swap_bytes[swap.swap_in] += swap.num_bytes
        events = self._core.update(
            decision, result.tokens, result.swaps_done, logprobs=result.logprobs
        )
        self._forward_s.append(result.forward_s)
        self._worker_used_blocks = result.num_used_blocks
        # Stats before events: a caller that has its last token also sees its job counted.
        self._publish_stats(force=any(e.kind is EventKind.FINISHED for e in events))
        return events

    def _drain_inbox(self, block: bool) -> None:
        if block:  # going idle: the snapshot must show where the last iteration left things
            self._publish_stats(force=True)
        try:
            message = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        events: list[Event] = []
        while True:
            events.extend(self._receive(message))
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._publish(0, events)
        self._publish_stats(force=True)

    def _receive(self, message: InboxMessage) -> list[Event]:
        core = self._core
        events: list[Event] = []
        match message:
            case Submit(owner, jobs, rejected, refused):
                for job_id, error in rejected:
                    events.append(Event(job_id, EventKind.REJECTED, owner=owner, error=error))
                for job_id in refused:
                    events.append(
                        Event(
                            job_id,
                            EventKind.REJECTED,
                            owner=owner,
                            error=SHUTTING_DOWN,
                            retry=True,
                        )
                    )
                for job in jobs:
                    job.owner = owner
                    events.extend(core.add_job(job))
            case Cancel(owner, job_ids):
                for job_id in job_ids:
                    if (job := core.job(job_id)) is not None and job.owner == owner:
                        events.extend(core.cancel(job_id))
            case Disconnect(owner):
                for job_id in core.job_ids():
                    if (job := core.job(job_id)) is not None and job.owner == owner:
                        core.cancel(job_id)  # nobody is left to hear about it
        return events

    def _publish(self, iteration_id: int, events: list[Event]) -> None:
        by_owner: dict[str, list[Event]] = {}
        for event in events:
            by_owner.setdefault(event.owner, []).append(event)
        with self._outboxes_lock:
            for owner, owned in by_owner.items():
                outbox = self._outboxes.get(owner)
                if outbox is not None:
                    outbox.put(Outgoing(iteration_id, owned))

    def _publish_stats(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._stats_at < STATS_INTERVAL_S:
            return
        self._stats_at = now
        with self._outboxes_lock:
            num_frontends = len(self._outboxes)
        forward = self._forward_s
        self._stats = EngineStats(
            core=self._core.stats(),
            mean_forward_s=sum(forward) / len(forward) if forward else 0.0,
            num_frontends=num_frontends,
            num_worker_used_blocks=self._worker_used_blocks,
            swap_out_bytes=self._swap_bytes[False],
            swap_in_bytes=self._swap_bytes[True],
            stages=self._stage_views(),
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
        while not self._stop.is_set():
            try:
                self._worker.open()
                break
            except WorkerError as exc:
                log.info("waiting for the workers: %s", exc)
                time.sleep(WORKER_RETRY_S)
        self._core.recompute_all()
