"""The frontend's one stream to the scheduler.

Submits and cancels from all requests are batched into one FrontendMessage; each
SchedulerMessage is split by job and handed to the waiting request as one list of events, so a
request wakes at most once per iteration. If the stream breaks, every open request is told
(LinkLost) and the link reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from fastserve.scheduler.v1 import scheduler_pb2 as spb
from fastserve.scheduler.v1 import scheduler_pb2_grpc
from services.common.grpc_server import CHANNEL_OPTIONS

log = logging.getLogger(__name__)

RECONNECT_INITIAL_S = 0.1
RECONNECT_MAX_S = 2.0


class LinkLost(Exception):
    """The scheduler stream broke while the job was in flight."""


class SchedulerLink:
    def __init__(self, address: str, on_state: Callable[[bool], None] | None = None) -> None:
        self.address = address
        self._on_state = on_state or (lambda connected: None)
        self._jobs: dict[str, asyncio.Queue[list[spb.JobEvent] | LinkLost]] = {}
        self._pending_submits: list[spb.Submit] = []
        self._pending_cancels: list[str] = []
        self._wake = asyncio.Event()
        self.connected = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self._channel:
            await self._channel.close()

    @property
    def num_open_jobs(self) -> int:
        return len(self._jobs)

    def submit(self, submit: spb.Submit) -> asyncio.Queue[list[spb.JobEvent] | LinkLost]:
        """Sends a job; returns the queue its events arrive on."""
        if not self.connected.is_set():
            raise LinkLost("not connected to the scheduler")
        events: asyncio.Queue[list[spb.JobEvent] | LinkLost] = asyncio.Queue()
        self._jobs[submit.job_id] = events
        self._pending_submits.append(submit)
        self._wake.set()
        return events

    def cancel(self, job_id: str) -> None:
        if self._jobs.pop(job_id, None) is not None:
            self._pending_cancels.append(job_id)
            self._wake.set()

    def forget(self, job_id: str) -> None:
        """The job finished; stop routing its events."""
        self._jobs.pop(job_id, None)

    async def _outgoing(self) -> AsyncIterator[spb.FrontendMessage]:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not (self._pending_submits or self._pending_cancels):
                continue
            message = spb.FrontendMessage(
                submits=self._pending_submits, cancel_job_ids=self._pending_cancels
            )
            self._pending_submits, self._pending_cancels = [], []
            yield message

    async def _run(self) -> None:
        backoff = RECONNECT_INITIAL_S
        self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        while True:
            try:
                await asyncio.wait_for(self._channel.channel_ready(), timeout=5)
                call = stub.Connect(self._outgoing())
                self.connected.set()
                self._on_state(True)
                log.info("connected to scheduler %s", self.address)
                backoff = RECONNECT_INITIAL_S
                async for message in call:
                    self._dispatch(message)
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, None, None, "scheduler closed the stream"
                )
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                if self.connected.is_set():
                    log.warning("scheduler stream lost: %s", exc)
                self._lose_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_S)

    def _dispatch(self, message: spb.SchedulerMessage) -> None:
        by_job: dict[str, list[spb.JobEvent]] = {}
        for event in message.events:
            by_job.setdefault(event.job_id, []).append(event)
        for job_id, events in by_job.items():
            queue = self._jobs.get(job_id)
            if queue is not None:
                queue.put_nowait(events)

    def _lose_all(self) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if was_connected:
            self._on_state(False)
        self._pending_submits, self._pending_cancels = [], []
        for queue in self._jobs.values():
            queue.put_nowait(LinkLost("lost the connection to the scheduler"))
        self._jobs.clear()
