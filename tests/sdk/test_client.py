"""The SDK against an in-process gRPC server running a scripted Generation double.

The double records every request and its metadata, and plays one script per call: responses to
send, an `Abort` to fail with, or `HOLD` to wait until the client goes away (and note that it
did). The real frontend is tested end to end elsewhere; here we test the client's behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from fastserve.v1 import generation_pb2 as pb
from fastserve.v1 import generation_pb2_grpc as pb_grpc
from fastserve_client import (
    AsyncClient,
    AuthenticationError,
    ChatMessage,
    Client,
    DeadlineExceededError,
    FastServeError,
    InvalidArgumentError,
    ModelInfo,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    Usage,
)
from services import generate_cmd

HOLD = "hold"
HOLD_LIMIT_S = 5.0


@dataclass
class Abort:
    code: grpc.StatusCode
    details: str = ""


class ScriptedServicer(pb_grpc.GenerationServicer):
    """Replays `scripts[i]` on the i-th Generate call (the last script repeats)."""

    def __init__(self) -> None:
        self.address = ""
        self.scripts: list[list[object]] = [[]]
        self.models: list[pb.ModelCard] = []
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.num_list_calls = 0
        # Set when a call ends before its script finished: the client cancelled or its deadline hit.
        self.client_gone = threading.Event()
        self._lock = threading.Lock()

    def Generate(self, request, context):
        with self._lock:
            index = len(self.requests)
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
        # The done callback fires however the call ends, even while this generator is suspended
        # at a `yield` and never resumed (the usual way a cancellation lands).
        ended = threading.Event()
        finished = threading.Event()

        def on_done() -> None:
            ended.set()
            if not finished.is_set():
                self.client_gone.set()

        context.add_callback(on_done)
        for step in self.scripts[min(index, len(self.scripts) - 1)]:
            if isinstance(step, Abort):
                finished.set()
                context.abort(step.code, step.details)
            elif step == HOLD:
                if not ended.wait(HOLD_LIMIT_S):
                    finished.set()  # the client never went away
                return
            else:
                yield step
        finished.set()

    def ListModels(self, request, context):
        self.num_list_calls += 1
        return pb.ListModelsResponse(models=self.models)


def text(delta: str, token_ids: list[int] | None = None) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id="req-1", text=delta, token_ids=token_ids or [])


def state(job_state: int, queue_level: int = 0) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id="req-1", state=job_state, queue_level=queue_level)


def final(reason: int = pb.FINISH_REASON_STOP, prompt_tokens: int = 3, completion_tokens: int = 2):
    return pb.GenerateResponse(
        request_id="req-1",
        finish_reason=reason,
        usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
    )


HELLO = [text("Hel", [1, 2]), text("lo", [3]), final(pb.FINISH_REASON_LENGTH, 4, 3)]
UNAVAILABLE = Abort(grpc.StatusCode.UNAVAILABLE, "frontend restarting")


@pytest.fixture
def double():
    servicer = ScriptedServicer()
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(grace=None)


def make_client(double: ScriptedServicer, **overrides) -> Client:
    return Client(double.address, **{"timeout": 5.0, **overrides})


def make_async_client(double: ScriptedServicer, **overrides) -> AsyncClient:
    return AsyncClient(double.address, **{"timeout": 5.0, **overrides})


# --- sync client -------------------------------------------------------------------------------


def test_stream_yields_states_deltas_and_final(double):
    double.scripts = [
        [
            state(pb.JOB_STATE_QUEUED, queue_level=2),
            state(pb.JOB_STATE_PREEMPTED),
            state(pb.JOB_STATE_RUNNING),
            *HELLO,
        ]
    ]
    with make_client(double) as client:
        chunks = list(client.generate("Say hello"))

    assert [c.state for c in chunks] == ["queued", "preempted", "running", None, None, None]
    assert [c.queue_level for c in chunks] == [2, None, None, None, None, None]
    assert [c.text for c in chunks] == ["", "", "", "Hel", "lo", ""]
    assert [c.token_ids for c in chunks] == [[], [], [], [1, 2], [3], []]
    assert [c.finish_reason for c in chunks] == [None] * 5 + ["length"]
    assert chunks[-1].usage == Usage(prompt_tokens=4, completion_tokens=3)
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.request_id for c in chunks} == {"req-1"}


def test_complete_assembles_the_whole_result(double):
    double.scripts = [[state(pb.JOB_STATE_QUEUED), *HELLO]]
    with make_client(double) as client:
        completion = client.complete("Say hello")

    assert completion.text == "Hello"
    assert completion.token_ids == [1, 2, 3]
    assert completion.finish_reason == "length"
    assert completion.usage == Usage(prompt_tokens=4, completion_tokens=3)
    assert completion.request_id == "req-1"


def test_complete_without_finish_reason_is_an_error(double):
    double.scripts = [[text("Hel")]]
    with make_client(double) as client, pytest.raises(FastServeError, match="finish reason"):
        client.complete("Say hello")


def test_unset_options_stay_unset(double):
    double.scripts = [HELLO]
    with make_client(double) as client:
        list(client.generate("Say hello"))

    request = double.requests[0]
    assert request.WhichOneof("input") == "prompt"
    assert request.prompt == "Say hello"
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        assert not request.HasField(name), name
    assert list(request.stop) == []
    assert request.ignore_eos is False
    assert request.model == ""


def test_set_options_are_sent_even_when_zero(double):
    double.scripts = [HELLO]
    with make_client(double) as client:
        list(
            client.generate(
                "Say hello",
                max_tokens=7,
                temperature=0.0,
                top_p=0.5,
                top_k=0,
                seed=0,
                stop="\n",
                ignore_eos=True,
                model="smollm2",
            )
        )

    request = double.requests[0]
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        assert request.HasField(name), name
    assert (request.max_tokens, request.temperature, request.top_p) == (7, 0.0, 0.5)
    assert (request.top_k, request.seed) == (0, 0)
    assert list(request.stop) == ["\n"]
    assert request.ignore_eos is True
    assert request.model == "smollm2"


def test_stop_list_and_chat_messages(double):
    double.scripts = [HELLO]
    messages = [ChatMessage("system", "Be brief."), {"role": "user", "content": "Hi"}]
    with make_client(double) as client:
        completion = client.complete(messages=messages, stop=["END", "\n\n"])

    request = double.requests[0]
    assert completion.text == "Hello"
    assert request.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
    ]
    assert list(request.stop) == ["END", "\n\n"]


def test_bad_local_input_is_rejected_before_sending(double):
    with make_client(double) as client:
        with pytest.raises(ValueError, match="exactly one"):
            client.complete("a", messages=[{"role": "user", "content": "b"}])
        with pytest.raises(ValueError, match="content"):
            client.chat([{"role": "user"}])
    assert double.requests == []


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError),
        (grpc.StatusCode.PERMISSION_DENIED, AuthenticationError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.INTERNAL, FastServeError),
    ],
)
def test_status_codes_raise_typed_errors_with_details(double, code, error_type):
    double.scripts = [[Abort(code, "temperature: must be >= 0")]]
    with make_client(double) as client, pytest.raises(error_type) as caught:
        list(client.generate("Say hello", temperature=-1.0))

    assert type(caught.value) is error_type
    assert caught.value.code == code
    assert caught.value.details == "temperature: must be >= 0"
    assert len(double.requests) == 1, "only UNAVAILABLE is retried"


def test_unavailable_is_retried_before_the_first_message(double):
    double.scripts = [[UNAVAILABLE], [UNAVAILABLE], HELLO]
    with make_client(double) as client:
        completion = client.complete("Say hello")

    assert completion.text == "Hello"
    assert len(double.requests) == 3


def test_retries_run_out(double):
    double.scripts = [[UNAVAILABLE]]
    with make_client(double, max_retries=1) as client, pytest.raises(UnavailableError) as caught:
        client.complete("Say hello")

    assert caught.value.details == "frontend restarting"
    assert len(double.requests) == 2


def test_unavailable_after_the_first_message_is_not_retried(double):
    double.scripts = [[text("Hel", [1]), UNAVAILABLE], HELLO]
    received = []
    with make_client(double) as client, pytest.raises(UnavailableError):
        for chunk in client.generate("Say hello"):
            received.append(chunk.text)

    assert received == ["Hel"]
    assert len(double.requests) == 1


def test_unreachable_server_raises_unavailable():
    with (
        socket_closed_port() as address,
        Client(address, max_retries=1, timeout=5.0) as client,
        pytest.raises(UnavailableError),
    ):
        client.list_models()


def test_breaking_out_cancels_the_call(double):
    double.scripts = [[text("Hel"), HOLD]]
    with make_client(double) as client:
        for chunk in client.generate("Say hello"):
            assert chunk.text == "Hel"
            break
        # The channel is still open, so only the dropped stream can have cancelled the call.
        assert double.client_gone.wait(1.0)


def test_closing_the_stream_cancels_the_call(double):
    double.scripts = [[text("Hel"), HOLD]]
    with make_client(double) as client:
        stream = client.generate("Say hello")
        assert next(stream).text == "Hel"
        assert not double.client_gone.wait(0.2)
        stream.close()
        assert double.client_gone.wait(1.0)


def test_api_key_is_sent_as_bearer_metadata(double):
    double.scripts = [HELLO]
    with make_client(double, api_key="sekrit") as client:
        client.complete("Say hello")
    with make_client(double) as client:
        client.complete("Say hello")

    assert double.metadata[0]["authorization"] == "Bearer sekrit"
    assert "authorization" not in double.metadata[1]


def test_deadline_raises_deadline_exceeded(double):
    double.scripts = [[HOLD]]
    started = time.monotonic()
    with make_client(double) as client, pytest.raises(DeadlineExceededError):
        client.complete("Say hello", timeout=0.3)

    assert time.monotonic() - started < 2.0
    assert double.client_gone.wait(1.0)


def test_list_models(double):
    double.models = [pb.ModelCard(name="smollm2", max_context_tokens=2048, has_chat_template=True)]
    with make_client(double) as client:
        assert client.list_models() == [
            ModelInfo(name="smollm2", max_context_tokens=2048, has_chat_template=True)
        ]


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


# --- fastserve generate ------------------------------------------------------------------------


def parse_generate_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("has_chat_template", "flags", "expected_input"),
    [(True, [], "chat"), (False, [], "prompt"), (True, ["--raw"], "prompt")],
)
def test_generate_cmd_picks_chat_or_raw(double, capsys, has_chat_template, flags, expected_input):
    double.models = [pb.ModelCard(name="m", has_chat_template=has_chat_template)]
    double.scripts = [HELLO]
    args = parse_generate_args("Say hello", "--address", double.address, *flags)

    assert generate_cmd.run(args) == 0

    assert capsys.readouterr().out == "Hello\n"
    request = double.requests[0]
    assert request.WhichOneof("input") == expected_input
    if expected_input == "chat":
        assert [(m.role, m.content) for m in request.chat.messages] == [("user", "Say hello")]
    else:
        assert request.prompt == "Say hello"
    assert (request.max_tokens, request.temperature) == (256, 0.0)
    assert request.HasField("temperature")
    assert not request.HasField("top_p")


def test_generate_cmd_passes_options_and_shows_events(double, capsys):
    double.scripts = [[state(pb.JOB_STATE_QUEUED, 1), state(pb.JOB_STATE_PREEMPTED)]]
    double.scripts[0] += [state(pb.JOB_STATE_RUNNING), *HELLO]
    args = parse_generate_args(
        "Say hello",
        *("--address", double.address, "--max-tokens", "9", "--top-k", "4", "--seed", "1"),
        *("--stop", "a", "--stop", "b", "--show-events"),
    )

    assert generate_cmd.run(args) == 0

    captured = capsys.readouterr()
    assert captured.out == "Hello\n"
    assert captured.err.splitlines() == ["[queued at level 1]", "[preempted]", "[resumed]"]
    request = double.requests[0]
    assert (request.max_tokens, request.top_k, request.seed) == (9, 4, 1)
    assert list(request.stop) == ["a", "b"]


def test_generate_cmd_error_prints_details_and_returns_1(double, capsys):
    double.scripts = [[Abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: must be > 0")]]
    args = parse_generate_args("Say hello", "--address", double.address, "--max-tokens", "0")

    assert generate_cmd.run(args) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: max_tokens: must be > 0\n"


def test_generate_cmd_address_defaults_from_env(monkeypatch):
    monkeypatch.setenv("FASTSERVE_ADDRESS", "10.0.0.1:6000")
    assert parse_generate_args("hi").address == "10.0.0.1:6000"
    monkeypatch.delenv("FASTSERVE_ADDRESS")
    assert parse_generate_args("hi").address == "127.0.0.1:50051"


@contextlib.contextmanager
def socket_closed_port():
    """An address nothing listens on: a port bound and released."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"127.0.0.1:{port}"
