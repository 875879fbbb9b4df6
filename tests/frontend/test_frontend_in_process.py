"""A real frontend (`Frontend.start`, what `fastserve frontend` runs) in this process, built from
its own flag parser, with no scheduler behind it: liveness versus readiness before any scheduler
answers, and the checks that come before the scheduler (prompt length, API keys)."""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastserve.v1 import generation_pb2 as pb
from fastserve.v1 import generation_pb2_grpc
from services.frontend.main import Frontend, add_arguments
from services.frontend.server import SERVICE_NAME

MAX_PROMPT_CHARS = 16
API_KEY = "sk-from-a-file"


def frontend_args(*argv: str) -> argparse.Namespace:
    """`fastserve frontend`'s flags; FASTSERVE_* variables are read here, as in the process."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--port", "0", "--http-port", "0", *argv])


def run(model, args, check):
    """Starts a frontend, runs `await check(http, channel)`, and stops it."""

    async def main():
        frontend = await Frontend.start(args, model)
        try:
            async with (
                aiohttp.ClientSession(f"http://127.0.0.1:{frontend.http_port}") as http,
                grpc.aio.insecure_channel(f"127.0.0.1:{frontend.grpc_port}") as channel,
            ):
                return await check(http, channel)
        finally:
            await frontend.stop()

    return asyncio.run(main())


async def status_and_body(response: aiohttp.ClientResponse) -> tuple[int, dict]:
    return response.status, await response.json()


async def grpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value


def test_health_is_200_while_ready_is_503_until_a_scheduler_connects(model, nobody):
    async def check(http, channel):
        await asyncio.sleep(0.5)  # the link has tried (and failed) to reach the scheduler
        async with http.get("/health") as response:
            assert await status_and_body(response) == (200, {"status": "alive"})
        async with http.get("/ready") as response:
            status, body = await status_and_body(response)
            assert status == 503 and "scheduler" in body["status"]
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # Not ready means refused at once, not queued.
        async with http.post("/v1/completions", json={"prompt": "Hi"}) as response:
            status, body = await status_and_body(response)
            assert (status, body["error"]["code"]) == (503, "unavailable")
        stub = generation_pb2_grpc.GenerationStub(channel)
        error = await grpc_error(stub.Generate(pb.GenerateRequest(prompt="Hi"), timeout=10))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        async with http.get("/health") as response:
            assert response.status == 200  # a lost scheduler never fails liveness

    run(model, frontend_args("--scheduler-address", nobody), check)


def test_a_prompt_over_max_prompt_chars_is_refused_naming_the_field(model, nobody):
    args = frontend_args("--scheduler-address", nobody, "--max-prompt-chars", str(MAX_PROMPT_CHARS))
    too_long = "x" * (MAX_PROMPT_CHARS + 1)
    problem = f"{MAX_PROMPT_CHARS + 1} characters exceed the limit of {MAX_PROMPT_CHARS}"

    async def check(http, channel):
        async with http.post("/v1/completions", json={"prompt": too_long}) as response:
            assert await status_and_body(response) == (
                400,
                {
                    "error": {
                        "message": f"prompt: {problem}",
                        "type": "invalid_request_error",
                        "param": "prompt",
                        "code": None,
                    }
                },
            )
        chat = {"messages": [{"role": "user", "content": too_long}]}
        async with http.post("/v1/chat/completions", json=chat) as response:
            status, body = await status_and_body(response)
            assert (status, body["error"]["param"]) == (400, "messages")
        # At the limit the prompt passes the check and reaches the (missing) scheduler.
        at_limit = {"prompt": "x" * MAX_PROMPT_CHARS}
        async with http.post("/v1/completions", json=at_limit) as response:
            assert response.status == 503

        stub = generation_pb2_grpc.GenerationStub(channel)
        error = await grpc_error(stub.Generate(pb.GenerateRequest(prompt=too_long), timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == f"prompt: {problem}"
        turn = pb.ChatMessage(role="user", content=too_long)
        request = pb.GenerateRequest(chat=pb.ChatInput(messages=[turn]))
        error = await grpc_error(stub.Generate(request, timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("chat.messages: ")

    run(model, args, check)


def test_api_key_file_from_the_environment_is_enforced(model, nobody, tmp_path, monkeypatch):
    path = tmp_path / "api-key"
    path.write_text(f"{API_KEY}\n")
    monkeypatch.delenv("FASTSERVE_API_KEY", raising=False)
    monkeypatch.setenv("FASTSERVE_API_KEY_FILE", str(path))  # what the chart's mountAsFile sets
    args = frontend_args("--scheduler-address", nobody)
    assert args.api_key_file == str(path)
    good = {"Authorization": f"Bearer {API_KEY}"}

    async def check(http, channel):
        for headers in [{}, {"Authorization": "Bearer wrong"}]:
            async with http.get("/v1/models", headers=headers) as response:
                status, body = await status_and_body(response)
                assert (status, body["error"]["code"]) == (401, "invalid_api_key")
        async with http.get("/v1/models", headers=good) as response:
            assert response.status == 200
        async with http.get("/health") as response:
            assert response.status == 200  # probes need no key
        stub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {API_KEY}"),)
        reply = await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
        assert [m.name for m in reply.models] == [model.name]

    run(model, args, check)
