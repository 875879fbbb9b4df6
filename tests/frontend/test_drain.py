"""Draining, in process: a real frontend (`Frontend.drain`, what SIGTERM starts) in front of a
scheduler that holds every job until the test releases it, so requests stay in flight exactly as
long as the test needs. The SIGTERM, exit code and real model are tests/e2e/test_drain.py's."""

from __future__ import annotations

import asyncio
import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastserve.v1 import generation_pb2 as pb
from fastserve.v1 import generation_pb2_grpc
from services.frontend.server import SERVICE_NAME
from tests.frontend.holding_scheduler import holding_stack
from tests.frontend.test_frontend_in_process import grpc_error
from tests.frontend.test_token_streaming import ids_of

WORDS = ("Hello", " world", "!", " ok")


async def sse_text(response) -> str:
    """The streamed completion's text; asserts the stream ended properly."""
    assert response.status == 200
    data = [
        line[6:].strip()
        for line in (await response.read()).decode().splitlines()
        if line.startswith("data: ")
    ]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    return "".join(c["choices"][0]["text"] for c in chunks)


async def health_status(channel) -> int:
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert overall.status == reply.status
    return reply.status


def test_drain_refuses_new_requests_and_lets_those_in_flight_finish(model):
    ids = ids_of(model, *WORDS)

    async def main() -> None:
        async with holding_stack(model) as (scheduler, frontend, http, channel):
            stub = generation_pb2_grpc.GenerationStub(channel)
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            body = {"prompt": "Say:", "max_tokens": 4, "stream": True}
            http_stream = asyncio.ensure_future(http.post("/v1/completions", json=body))
            grpc_stream = stub.Generate(pb.GenerateRequest(prompt="Say:", max_tokens=4))
            job_ids = await scheduler.wait_for_submits(2)

            drained = asyncio.ensure_future(frontend.drain(timeout_s=30))
            await asyncio.sleep(0.1)
            assert not drained.done()  # two requests in flight
            async with http.get("/ready") as response:
                assert response.status == 503
                assert await response.json() == {"status": "not ready: draining"}
            async with http.get("/health") as response:
                assert response.status == 200  # alive: not to be restarted
            assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            async with http.post("/v1/completions", json={"prompt": "Hi"}) as response:
                error = (await response.json())["error"]
                assert (response.status, error["code"]) == (503, "unavailable")
                assert response.headers["Retry-After"] == "1"
                assert response.headers["Connection"] == "close"
            failure = await grpc_error(stub.Generate(pb.GenerateRequest(prompt="Hi")))
            assert failure.code() == grpc.StatusCode.UNAVAILABLE
            assert ("retry-after", "1") in tuple(failure.trailing_metadata())
            assert len(scheduler.submits) == 2  # the refused ones never reached it

            for job_id in job_ids:
                scheduler.release(job_id, ids)
            async with await http_stream as response:
                assert await sse_text(response) == "".join(WORDS)
            responses = [r async for r in grpc_stream]
            assert "".join(r.text for r in responses) == "".join(WORDS)
            assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert await asyncio.wait_for(drained, 10) == 0
            assert scheduler.cancelled == []

    asyncio.run(main())


def test_drain_gives_up_after_its_timeout_or_a_second_signal(model):
    async def main() -> None:
        async with holding_stack(model) as (scheduler, frontend, _, channel):
            stub = generation_pb2_grpc.GenerationStub(channel)
            call = stub.Generate(pb.GenerateRequest(prompt="Say:", max_tokens=4))
            await scheduler.wait_for_submits(1)
            loop = asyncio.get_running_loop()
            start = loop.time()
            assert await frontend.drain(timeout_s=0.3) == 1
            assert 0.3 <= loop.time() - start < 2
            interrupt = asyncio.Event()
            loop.call_later(0.2, interrupt.set)
            assert await frontend.drain(timeout_s=30, interrupt=interrupt) == 1
            assert loop.time() - start < 2
            call.cancel()

    asyncio.run(main())


def test_a_scheduler_that_reconnects_while_draining_does_not_make_it_ready(model):
    async def main() -> None:
        async with holding_stack(model) as (scheduler, frontend, http, channel):
            await frontend.drain(timeout_s=0)
            scheduler.drop_connection()
            await scheduler.wait_for(lambda: scheduler.num_connects == 2)
            await asyncio.wait_for(frontend.link.connected.wait(), 10)
            await asyncio.sleep(0.1)  # the health update is a task of its own
            assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            async with http.get("/ready") as response:
                assert response.status == 503

    asyncio.run(main())
