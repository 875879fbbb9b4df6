"""The sync SDK client against the scripted double (tests/sdk/scripted.py)."""

from __future__ import annotations

import time

import grpc
import pytest

from fastserve.v1 import generation_pb2 as pb
from fastserve_client import (
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
from tests.sdk.scripted import (
    HELLO,
    HOLD,
    UNAVAILABLE,
    Abort,
    make_client,
    socket_closed_port,
    state,
    text,
)

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
