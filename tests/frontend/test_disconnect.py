"""A client that goes away is a client disconnect: its job is cancelled at the scheduler, it is
counted as status 499 (not a 5xx), and nothing is logged as an error.

Two ways to go away: while the request waits for its first token (aiohttp cancels the handler),
and just as the stream starts (the first write finds the connection closing: a race with the
first token that a real client hits now and then, pinned down here by closing the connection in
the same loop step the token arrives)."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
from prometheus_client.parser import text_string_to_metric_families

from fastserve.scheduler.v1 import scheduler_pb2 as spb
from fastserve.v1 import generation_pb2 as pb
from fastserve.v1 import generation_pb2_grpc
from services.frontend.auth import ApiKeys
from services.frontend.generation import GenerationCore
from services.frontend.metrics import FrontendMetrics
from services.frontend.openai_http import OpenAIServer
from tests.frontend.holding_scheduler import holding_stack
from tests.frontend.test_token_streaming import ids_of, one_token_per_iteration

BODY = json.dumps({"prompt": "Say:", "max_tokens": 8, "stream": True}).encode()
REQUEST = (
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


def http_statuses(exposition: str) -> dict[tuple[str, str], float]:
    """(route, status) -> responses, from /metrics text."""
    counts = {}
    for family in text_string_to_metric_families(exposition):
        if family.name == "fastserve_http_responses":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = (sample.labels["route"], sample.labels["status"])
                    counts[key] = sample.value
    return counts


def errors_logged(caplog) -> list[str]:
    """Errors the frontend or its HTTP server logged (gRPC's own teardown noise aside)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(("services.", "aiohttp."))
    ]


class HeldLink:
    """Stands in for the scheduler link: each job's event queue is the test's to fill."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue] = {}
        self.cancelled: list[str] = []
        self.submitted = asyncio.Event()

    def submit(self, submit: spb.Submit) -> asyncio.Queue:
        self.queues[submit.job_id] = asyncio.Queue()
        self.submitted.set()
        return self.queues[submit.job_id]

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def forget(self, job_id: str) -> None:
        pass


def test_hanging_up_as_the_stream_starts_is_a_client_disconnect(model, caplog):
    caplog.set_level(logging.DEBUG)
    link = HeldLink()
    metrics = FrontendMetrics()
    core = GenerationCore(model, link, default_max_tokens=64, metrics=metrics)  # type: ignore[arg-type]
    server = OpenAIServer(core, ApiKeys([]), metrics, max_body_bytes=1 << 20, is_ready=lambda: True)

    async def main() -> None:
        port = await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(REQUEST)
            await asyncio.wait_for(link.submitted.wait(), 10)
            (job_id,) = link.queues
            # The first token arrives, and in the same step the client's connection closes: the
            # handler wakes first and writes the stream's headers to a closing transport.
            for batch in one_token_per_iteration(job_id, ids_of(model, "Hello", " ok")):
                link.queues[job_id].put_nowait(batch)
            (connection,) = server._runner.server.connections  # type: ignore[union-attr]
            connection.transport.close()
            assert await reader.read() == b""  # nothing was sent
            writer.close()
            for _ in range(50):
                if link.cancelled:
                    break
                await asyncio.sleep(0.02)
            assert link.cancelled == [job_id]
            assert core.num_in_flight == 0
            body = await metrics.render(core.num_in_flight)
            assert http_statuses(body.decode()) == {("/v1/completions", "499"): 1.0}
            assert (
                metrics.registry.get_sample_value(
                    "fastserve_requests_total", {"finish_reason": "cancelled"}
                )
                == 1.0
            )
        finally:
            await server.stop()

    asyncio.run(main())
    assert errors_logged(caplog) == []


def test_hanging_up_while_waiting_cancels_the_job_at_the_scheduler(model, caplog):
    """Over HTTP and gRPC, against a real frontend and a scheduler that holds every job."""
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        async with holding_stack(model) as (scheduler, frontend, http, channel):
            _, writer = await asyncio.open_connection("127.0.0.1", frontend.http_port)
            writer.write(REQUEST)
            (http_job,) = await scheduler.wait_for_submits(1)
            writer.close()
            await scheduler.wait_for(lambda: http_job in scheduler.cancelled)

            stub = generation_pb2_grpc.GenerationStub(channel)
            call = stub.Generate(pb.GenerateRequest(prompt="Say:", max_tokens=8))
            grpc_job = (await scheduler.wait_for_submits(2))[1]
            call.cancel()
            await scheduler.wait_for(lambda: grpc_job in scheduler.cancelled)
            assert (await call.code()) == grpc.StatusCode.CANCELLED

            async with http.get("/metrics") as response:
                statuses = http_statuses(await response.text())
            assert statuses.get(("/v1/completions", "499")) == 1.0
            assert not [s for (_, s) in statuses if s.startswith("5")]

    asyncio.run(main())
    assert errors_logged(caplog) == []
