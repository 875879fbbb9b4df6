"""The asyncio SDK client against the scripted double (tests/sdk/scripted.py)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from fastserve.v1 import generation_pb2 as pb
from fastserve_client import (
    AuthenticationError,
    ChatMessage,
    DeadlineExceededError,
    InvalidArgumentError,
    ModelInfo,
    ResourceExhaustedError,
    UnavailableError,
    Usage,
)
from tests.sdk.scripted import (
    HELLO,
    HOLD,
    UNAVAILABLE,
    Abort,
    make_async_client,
    state,
    text,
)

# --- asyncio client ----------------------------------------------------------------------------


def test_async_stream_and_complete(double):
    double.scripts = [[state(pb.JOB_STATE_QUEUED, queue_level=1), *HELLO]]

    async def main():
        async with make_async_client(double) as client:
            chunks = [c async for c in client.generate("Say hello", max_tokens=5)]
            completion = await client.complete(messages=[ChatMessage("user", "Hi")], stop="x")
        return chunks, completion

    chunks, completion = asyncio.run(main())
    assert [(c.state, c.queue_level) for c in chunks[:2]] == [("queued", 1), (None, None)]
    assert "".join(c.text for c in chunks) == "Hello"
    assert chunks[-1].finish_reason == "length"
    assert completion.text == "Hello"
    assert completion.usage == Usage(prompt_tokens=4, completion_tokens=3)
    first, second = double.requests
    assert first.prompt == "Say hello"
    assert first.HasField("max_tokens")
    assert not first.HasField("temperature")
    assert [(m.role, m.content) for m in second.chat.messages] == [("user", "Hi")]
    assert list(second.stop) == ["x"]


def test_async_client_can_be_built_outside_the_loop(double):
    double.scripts = [HELLO]
    client = make_async_client(double)

    async def main():
        async with client:
            return await client.complete("Say hello")

    assert asyncio.run(main()).text == "Hello"


def test_async_typed_error_keeps_details(double):
    double.scripts = [[Abort(grpc.StatusCode.INVALID_ARGUMENT, "top_p: must be in (0, 1]")]]

    async def main():
        async with make_async_client(double) as client:
            await client.complete("Say hello", top_p=2.0)

    with pytest.raises(InvalidArgumentError) as caught:
        asyncio.run(main())
    assert caught.value.details == "top_p: must be in (0, 1]"


def test_async_resource_exhausted_and_unauthenticated(double):
    double.scripts = [
        [Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")],
        [Abort(grpc.StatusCode.UNAUTHENTICATED, "bad key")],
    ]

    async def main():
        async with make_async_client(double, api_key="wrong") as client:
            with pytest.raises(ResourceExhaustedError):
                await client.complete("Say hello")
            with pytest.raises(AuthenticationError):
                await client.complete("Say hello")

    asyncio.run(main())
    assert len(double.requests) == 2
    assert double.metadata[1]["authorization"] == "Bearer wrong"


def test_async_retry_then_success(double):
    double.scripts = [[UNAVAILABLE], [UNAVAILABLE], HELLO]

    async def main():
        async with make_async_client(double) as client:
            return await client.complete("Say hello")

    assert asyncio.run(main()).text == "Hello"
    assert len(double.requests) == 3


def test_async_no_retry_after_the_first_message(double):
    double.scripts = [[text("Hel"), UNAVAILABLE], HELLO]

    async def main():
        received = []
        async with make_async_client(double) as client:
            with pytest.raises(UnavailableError):
                async for chunk in client.generate("Say hello"):
                    received.append(chunk.text)
        return received

    assert asyncio.run(main()) == ["Hel"]
    assert len(double.requests) == 1


def test_async_breaking_out_cancels_the_call(double):
    double.scripts = [[text("Hel"), HOLD]]

    async def main():
        async with make_async_client(double) as client:
            async for chunk in client.generate("Say hello"):
                assert chunk.text == "Hel"
                break
            # Checked before the channel closes, which would cancel the call anyway.
            return await asyncio.to_thread(double.client_gone.wait, 1.0)

    assert asyncio.run(main())


def test_async_aclose_cancels_the_call(double):
    double.scripts = [[text("Hel"), HOLD]]

    async def main():
        async with make_async_client(double) as client:
            async with contextlib.aclosing(client.generate("Say hello")) as stream:
                async for _ in stream:
                    break
            return await asyncio.to_thread(double.client_gone.wait, 1.0)

    assert asyncio.run(main())


def test_async_deadline_and_list_models(double):
    double.scripts = [[HOLD]]
    double.models = [pb.ModelCard(name="m", max_context_tokens=64)]

    async def main():
        async with make_async_client(double) as client:
            models = await client.list_models()
            with pytest.raises(DeadlineExceededError):
                await client.complete("Say hello", timeout=0.3)
        return models

    assert asyncio.run(main()) == [
        ModelInfo(name="m", max_context_tokens=64, has_chat_template=False)
    ]
