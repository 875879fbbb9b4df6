"""A scheduler double that holds every job until the test releases it, and a real frontend
(`Frontend.start`) in this process in front of it: requests in flight for as long as a test
needs, and the submits and cancels the frontend sent, as the scheduler saw them."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from contextlib import asynccontextmanager

import aiohttp
import grpc

from fastserve.scheduler.v1 import scheduler_pb2 as spb
from fastserve.scheduler.v1 import scheduler_pb2_grpc
from services.frontend.main import Frontend, add_arguments
from tests.frontend.test_token_streaming import one_token_per_iteration

WAIT_S = 10.0


class HoldingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Records what each frontend sends and answers only with what `release` queues."""

    def __init__(self) -> None:
        self.submits: list[spb.Submit] = []
        self.cancelled: list[str] = []
        self._outbox: asyncio.Queue[spb.SchedulerMessage | None] = asyncio.Queue()
        self.num_connects = 0
        self._changed = asyncio.Event()

    async def Connect(self, request_iterator, context):
        async def read() -> None:
            async for message in request_iterator:
                self.submits.extend(message.submits)
                self.cancelled.extend(message.cancel_job_ids)
                self._changed.set()

        self.num_connects += 1
        self._changed.set()
        reader = asyncio.ensure_future(read())
        try:
            while (message := await self._outbox.get()) is not None:
                yield message
        finally:
            reader.cancel()

    async def Stats(self, request, context) -> spb.StatsResponse:
        return spb.StatsResponse()

    async def wait_for(self, predicate) -> None:
        """Waits until `predicate()` holds (checked whenever a frontend message arrives)."""

        async def loop() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), WAIT_S)

    async def wait_for_submits(self, count: int) -> list[str]:
        await self.wait_for(lambda: len(self.submits) >= count)
        return [s.job_id for s in self.submits]

    def drop_connection(self) -> None:
        """Ends the frontend's Connect stream, as a restarting scheduler would."""
        self._outbox.put_nowait(None)

    def release(self, job_id: str, ids: Sequence[int]) -> None:
        """Sends `ids` as the job's output, one token per iteration, the last one finishing."""
        for events in one_token_per_iteration(job_id, ids):
            self._outbox.put_nowait(spb.SchedulerMessage(events=events))


def frontend_args(scheduler_address: str, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--port", "0", "--http-port", "0", "--scheduler-address", scheduler_address, *argv]
    )


@asynccontextmanager
async def holding_stack(model, *argv: str):
    """Yields (scheduler, frontend, http session, gRPC channel), the frontend connected."""
    scheduler = HoldingScheduler()
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    frontend = await Frontend.start(frontend_args(f"127.0.0.1:{port}", *argv), model)
    try:
        await asyncio.wait_for(frontend.link.connected.wait(), WAIT_S)
        async with (
            aiohttp.ClientSession(f"http://127.0.0.1:{frontend.http_port}") as http,
            grpc.aio.insecure_channel(f"127.0.0.1:{frontend.grpc_port}") as channel,
        ):
            yield scheduler, frontend, http, channel
    finally:
        await frontend.stop()
        await server.stop(None)
