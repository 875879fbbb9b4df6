"""What each surface refuses, and how: a real frontend (`Frontend.start`) in this process, asked
over real HTTP and gRPC. Both surfaces share one set of checks (validation.py), so they refuse
the same requests, naming the same field each in its own spelling; refusals a client can retry
say when (Retry-After / `retry-after` trailing metadata), a missing key says how to send one, and
no error quotes a client's huge value back in full."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from fastserve.v1 import generation_pb2 as pb
from fastserve.v1 import generation_pb2_grpc
from fastserve_client import AsyncClient
from fastserve_client.errors import ResourceExhaustedError
from services.common.sampling import MAX_TEMPERATURE
from services.frontend.validation import MAX_CHAT_MESSAGES, MAX_ECHO_CHARS
from tests.frontend.holding_scheduler import holding_stack
from tests.frontend.test_frontend_in_process import frontend_args, grpc_error, run

HUGE = "m" * 100_000


def user(content: str = "Hi") -> dict[str, str]:
    return {"role": "user", "content": content}


# (what is wrong, chat messages, sampling, field on HTTP, field on gRPC)
REFUSED = [
    ("an unknown role", [user(), {"role": "wizard", "content": "x"}], {},
     "messages[1].role", "chat.messages[1].role"),
    ("the tool role", [{"role": "tool", "content": "42"}], {},
     "messages[0].role", "chat.messages[0].role"),
    ("an empty role", [{"role": "", "content": "x"}], {},
     "messages[0].role", "chat.messages[0].role"),
    ("too many messages", [user()] * (MAX_CHAT_MESSAGES + 1), {},
     "messages", "chat.messages"),
    ("a huge temperature", [user()], {"temperature": 1e30},
     "temperature", "temperature"),
    ("a temperature just past the maximum", [user()], {"temperature": MAX_TEMPERATURE + 0.01},
     "temperature", "temperature"),
]  # fmt: skip


def test_both_surfaces_refuse_the_same_chats_naming_the_field(model, nobody):
    async def check(http, channel):
        stub = generation_pb2_grpc.GenerationStub(channel)
        for why, messages, sampling, http_field, grpc_field in REFUSED:
            body = {"messages": messages, **sampling}
            async with http.post("/v1/chat/completions", json=body) as response:
                error = (await response.json())["error"]
                assert (response.status, error["param"]) == (400, http_field), why
                assert error["type"] == "invalid_request_error", why
                assert error["message"].startswith(f"{http_field}: "), why
            turns = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
            request = pb.GenerateRequest(chat=pb.ChatInput(messages=turns), **sampling)
            failure = await grpc_error(stub.Generate(request, timeout=10))
            assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT, why
            assert failure.details().startswith(f"{grpc_field}: "), why
            # The completions route and a raw prompt refuse a bad temperature the same way.
            if sampling:
                body = {"prompt": "Hi", **sampling}
                async with http.post("/v1/completions", json=body) as response:
                    assert (
                        response.status == 400
                        and (await response.json())["error"]["param"] == "temperature"
                    )
                request = pb.GenerateRequest(prompt="Hi", **sampling)
                failure = await grpc_error(stub.Generate(request, timeout=10))
                assert failure.details().startswith("temperature: "), why
        # At the limits a chat passes these checks: 1024 messages only overflow the tiny
        # model's context (512 tokens), and three reach the (missing) scheduler.
        body = {"messages": [user()] * MAX_CHAT_MESSAGES, "temperature": MAX_TEMPERATURE}
        async with http.post("/v1/chat/completions", json=body) as response:
            assert (response.status, (await response.json())["error"]["param"]) == (400, "prompt")
        turns = [pb.ChatMessage(role=r, content="x") for r in ("system", "user", "assistant")]
        request = pb.GenerateRequest(chat=pb.ChatInput(messages=turns), temperature=2.0)
        failure = await grpc_error(stub.Generate(request, timeout=10))
        assert failure.code() == grpc.StatusCode.UNAVAILABLE

    run(model, frontend_args("--scheduler-address", nobody), check)


def test_a_huge_model_name_or_field_is_not_echoed_back(model, nobody):
    async def check(http, channel):
        async with http.post("/v1/completions", json={"model": HUGE, "prompt": "Hi"}) as response:
            error = (await response.json())["error"]
            assert (response.status, error["code"], error["param"]) == (
                404,
                "model_not_found",
                "model",
            )
            assert HUGE[:MAX_ECHO_CHARS] in error["message"] and len(error["message"]) < 300
        async with http.post("/v1/completions", json={HUGE: 1, "prompt": "Hi"}) as response:
            error = (await response.json())["error"]
            assert response.status == 400 and len(error["param"]) <= MAX_ECHO_CHARS + 1
        chat = {"messages": [{"role": HUGE, "content": "x"}]}
        async with http.post("/v1/chat/completions", json=chat) as response:
            error = (await response.json())["error"]
            assert response.status == 400 and len(error["message"]) < 300
        stub = generation_pb2_grpc.GenerationStub(channel)
        failure = await grpc_error(stub.Generate(pb.GenerateRequest(model=HUGE, prompt="Hi")))
        assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.details().startswith("model: ") and len(failure.details()) < 300

    run(model, frontend_args("--scheduler-address", nobody), check)


def test_401_says_to_send_a_bearer_token(model, nobody, monkeypatch):
    monkeypatch.delenv("FASTSERVE_API_KEY_FILE", raising=False)
    monkeypatch.setenv("FASTSERVE_API_KEY", "sk-key")

    async def check(http, channel):
        async with http.post("/v1/completions", json={"prompt": "Hi"}) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"

    run(model, frontend_args("--scheduler-address", nobody), check)


def test_refusals_a_client_may_retry_say_when(model, nobody):
    """503 (no scheduler) on HTTP; UNAVAILABLE with `retry-after` on gRPC."""

    async def check(http, channel):
        async with http.post("/v1/completions", json={"prompt": "Hi"}) as response:
            assert response.status == 503 and response.headers["Retry-After"] == "1"
        stub = generation_pb2_grpc.GenerationStub(channel)
        call = stub.Generate(pb.GenerateRequest(prompt="Hi"), timeout=10)
        failure = await grpc_error(call)
        assert failure.code() == grpc.StatusCode.UNAVAILABLE
        assert ("retry-after", "1") in tuple(failure.trailing_metadata())

    run(model, frontend_args("--scheduler-address", nobody), check)


def test_a_full_queue_is_429_with_retry_after_and_resource_exhausted_with_a_hint(model):
    async def main():
        async with holding_stack(model, "--max-queued-requests", "1") as (sched, fe, http, ch):
            stub = generation_pb2_grpc.GenerationStub(ch)
            held = stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=4))
            await sched.wait_for_submits(1)
            async with http.post("/v1/completions", json={"prompt": "Hi"}) as response:
                error = (await response.json())["error"]
                assert (response.status, error["code"]) == (429, "rate_limit_exceeded")
                assert response.headers["Retry-After"] == "1"
            failure = await grpc_error(stub.Generate(pb.GenerateRequest(prompt="Hi")))
            assert failure.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ("retry-after", "1") in tuple(failure.trailing_metadata())
            # The SDK hands the hint to its caller.
            async with AsyncClient(f"127.0.0.1:{fe.grpc_port}") as client:
                with pytest.raises(ResourceExhaustedError) as info:
                    await client.complete("Hi", max_tokens=4)
            assert info.value.retry_after_s == 1.0
            held.cancel()

    asyncio.run(main())
