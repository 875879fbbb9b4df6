"""OpenAI-compatible HTTP end to end: the official `openai` client against `fastserve up`."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastserve.v1 import generation_pb2 as pb
from fastserve.v1 import generation_pb2_grpc
from fastserve_client import Client
from services.common.health import is_serving
from testing.stack import Stack, pid_alive

pytestmark = [pytest.mark.e2e]

API_KEY = "sk-test-key"
MAX_QUEUED = 2


def http_address(stack: Stack) -> str:
    for line in stack.output:
        match = re.search(r"HTTP http://(\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError("no HTTP address in the ready line")


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    stack = Stack.start(
        tiny_model_dir, "--http-port", "0", "--num-blocks", "128", "--max-batch-size", "16"
    )
    stack.http = http_address(stack)
    stack.model = tiny_model_dir.name
    yield stack
    assert stack.stop() == 0, "".join(stack.output[-40:])


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=f"http://{stack.http}/v1", api_key="unused", max_retries=0)


def post(stack, path: str, body: bytes | dict, headers: dict | None = None, timeout: float = 30):
    """(status, parsed body or raw text) of a POST; never raises on HTTP errors."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{stack.http}{path}",
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    return _open(request, timeout)


def get(stack, path: str, headers: dict | None = None):
    request = urllib.request.Request(f"http://{stack.http}{path}", headers=headers or {})
    return _open(request, 30)


def _open(request, timeout):
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def test_completion_and_chat_greedy_text_equals_grpc(stack, oai, tiny_model_dir):
    prompt = "The capital of France is"
    with Client(stack.address) as client:
        ref = client.complete(prompt, max_tokens=12, temperature=0, ignore_eos=True)
        chat_ref = client.complete(
            messages=[{"role": "user", "content": "Hi there"}],
            max_tokens=8,
            temperature=0,
            ignore_eos=True,
        )
    extra = {"ignore_eos": True}
    done = oai.completions.create(
        model=tiny_model_dir.name, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra
    )
    assert done.choices[0].text == ref.text
    assert done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == ref.usage.prompt_tokens
    assert done.usage.completion_tokens == 12
    assert done.usage.total_tokens == ref.usage.prompt_tokens + 12

    stream = oai.completions.create(
        model=tiny_model_dir.name,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": "Hi there"}]
    chat = oai.chat.completions.create(
        model=tiny_model_dir.name,
        messages=messages,
        max_completion_tokens=8,
        temperature=0,
        extra_body=extra,
    )
    assert chat.choices[0].message.content == chat_ref.text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == chat_ref.usage.prompt_tokens
    chat_stream = oai.chat.completions.create(
        model=tiny_model_dir.name,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body=extra,
    )
    chunks = list(chat_stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sse_ends_with_done_and_stop_strings_cut(stack, oai):
    full = oai.completions.create(
        model=stack.model, prompt="Once upon a time", max_tokens=20, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    text = full.choices[0].text
    stop = text[5:9]
    cut = oai.completions.create(
        model=stack.model, prompt="Once upon a time", max_tokens=20, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True}, seed=3, top_p=0.5,
    )  # fmt: skip
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    raw = raw_sse(stack, {"prompt": "Hi", "max_tokens": 3, "stream": True}, close_after=None)
    events = [line for line in raw.splitlines() if line.startswith("data: ")]  # chunked framing
    assert events[-1] == "data: [DONE]", raw


def test_models_health_ready(stack, oai, tiny_model_dir):
    (model,) = oai.models.list().data
    assert model.id == tiny_model_dir.name
    assert get(stack, "/health") == (200, {"status": "alive"})
    assert get(stack, "/ready") == (200, {"status": "ready"})


BAD_BODIES = [
    (400, "max_tokens", {"prompt": "hi", "max_tokens": 0}),
    (400, "max_tokens", {"prompt": "hi", "max_tokens": "5"}),
    (400, "max_tokens", {"prompt": "hi", "max_tokens": 10**30}),
    (400, "max_tokens", {"prompt": "hi", "max_tokens": 100_000}),
    (400, "temperature", {"prompt": "hi", "temperature": -1}),
    (400, "top_p", {"prompt": "hi", "top_p": 2}),
    (400, "top_k", {"prompt": "hi", "top_k": -5}),
    (400, "seed", {"prompt": "hi", "seed": -1}),
    (400, "n", {"prompt": "hi", "n": 2}),
    (400, "logprobs", {"prompt": "hi", "logprobs": 21}),
    (400, "stop[0]", {"prompt": "hi", "stop": [""]}),
    (400, "prompt", {"prompt": ""}),
    (400, "prompt", {"max_tokens": 3}),
    (400, "bogus", {"prompt": "hi", "bogus": 1}),
    (400, "stream_options", {"prompt": "hi", "stream_options": {"include_usage": True}}),
    (404, "model", {"prompt": "hi", "model": "no-such-model"}),
]


@pytest.mark.parametrize("status,param,body", BAD_BODIES)
def test_bad_completion_bodies_name_the_field(stack, status, param, body):
    got_status, got = post(stack, "/v1/completions", body)
    assert got_status == status, got
    assert got["error"]["param"] == param, got
    assert got["error"]["message"]


def test_bad_chat_and_transport_errors(stack):
    status, body = post(stack, "/v1/chat/completions", {"messages": []})
    assert (status, body["error"]["param"]) == (400, "messages")
    status, body = post(stack, "/v1/chat/completions", {"messages": [{"role": "x"}]})
    assert (status, body["error"]["param"]) == (400, "messages[0].role")
    status, body = post(stack, "/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert (status, body["error"]["param"]) == (400, "messages[0].content")
    status, body = post(stack, "/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(stack, "/v1/completions", b'{"prompt": "hi", "temperature": NaN}')
    assert status == 400 and "NaN" in body["error"]["message"]
    status, body = post(stack, "/v1/completions", b'{"prompt": "\xff\xfe"}')
    assert status == 400 and "UTF-8" in body["error"]["message"]
    status, body = post(stack, "/v1/completions", b'{"prompt": "\\ud800"}')
    assert (status, body["error"]["param"]) == (400, "prompt")
    status, body = post(stack, "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = post(stack, "/v1/completions", b"x" * (2 << 20))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = get(stack, "/v1/nothing-here")
    assert status == 404 and body["error"]["type"] == "not_found_error"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
FIELDS = [
    "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
    "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs", "top_k", "ignore_eos",
    "priority", "model", "echo", "suffix", "x-unknown",
]  # fmt: skip


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5),
    mangle=st.sampled_from(["none", "truncate", "bad-utf8", "nan"]),
)
def test_fuzzed_http_bodies_get_4xx_naming_the_problem(stack, path, body, mangle):
    body.setdefault("max_tokens", 2)
    raw = json.dumps(body, allow_nan=True).encode()
    if mangle == "truncate":
        raw = raw[: len(raw) // 2]
    elif mangle == "bad-utf8":
        raw = raw[:1] + b"\xc3\x28" + raw[1:]
    elif mangle == "nan":
        raw = raw[:-1] + b', "temperature": Infinity}'
    status, reply = post(stack, path, raw)
    if status == 200:
        return  # a body that happened to be valid
    assert 400 <= status < 500, (status, reply)
    error = reply["error"]
    assert error["message"] and set(error) == {"message", "type", "param", "code"}
    if error["param"] is not None:
        assert error["param"].split(".")[0].split("[")[0] in [*FIELDS, "messages", "stop"]


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    prompt=st.text(max_size=30),
    max_tokens=st.none() | st.integers(-(2**31), 2**31 - 1),
    temperature=st.none() | st.floats(width=32),
    top_p=st.none() | st.floats(width=32),
    top_k=st.none() | st.integers(-(2**31), 2**31 - 1),
    stop=st.lists(st.text(max_size=300), max_size=20),
    garbage=st.none() | st.binary(max_size=40),
)
def test_fuzzed_grpc_requests_get_invalid_argument(
    stack, prompt, max_tokens, temperature, top_p, top_k, stop, garbage
):
    request = pb.GenerateRequest(prompt=prompt, stop=stop)
    for name, value in [
        ("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
        ("top_k", top_k),
    ]:  # fmt: skip
        if value is not None:
            setattr(request, name, value)
    if request.HasField("max_tokens") is False:
        request.max_tokens = 2
    payload = request.SerializeToString() + (garbage or b"")
    with grpc.insecure_channel(stack.address) as channel:
        call = channel.unary_stream(
            "/fastserve.v1.Generation/Generate",
            request_serializer=lambda b: b,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        try:
            list(call(payload, timeout=30))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            assert re.match(r"^[\w.\[\]]+: ", exc.details()), exc.details()


def test_everything_still_serves_after_the_fuzzing(stack, oai):
    assert all(pid_alive(pid) for pid in stack.child_pids())
    assert is_serving(stack.address)
    done = oai.completions.create(model=stack.model, prompt="Hello", max_tokens=3)
    assert done.usage.completion_tokens >= 1


def raw_sse(stack, body: dict, close_after: int | None) -> str:
    """POSTs a streaming request on a bare socket; closes after `close_after` events."""
    host, port = stack.http.rsplit(":", 1)
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    received = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + data)
        while close_after is None or received.count(b"data: ") < close_after:
            piece = sock.recv(4096)
            if not piece:
                break
            received += piece
    return received.decode(errors="replace")


def test_http_disconnect_cancels_the_job(stack):
    before = stack.scheduler_stats()
    body = {"prompt": "Tell me a long story", "max_tokens": 400, "ignore_eos": True}
    received = raw_sse(stack, {**body, "stream": True}, close_after=3)
    assert received.count("data: ") >= 3
    stats = stack.wait_until_idle(lambda s: s["cancelled_jobs"] > before["cancelled_jobs"])
    assert stats["cancelled_jobs"] == before["cancelled_jobs"] + 1
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_two_hundred_dropped_streams_leave_no_blocks(stack):
    rng = random.Random(0)

    def drop_http(events: int) -> None:
        body = {"prompt": "Count: 1 2 3", "max_tokens": 200, "ignore_eos": True, "stream": True}
        raw_sse(stack, body, close_after=events)

    def drop_grpc(events: int) -> None:
        with Client(stack.address) as client:
            stream = client.generate("Count: 1 2 3", max_tokens=200, ignore_eos=True)
            for i, _ in enumerate(stream):
                if i + 1 >= events:
                    break
            stream.close()

    before = stack.scheduler_stats()
    jobs = [(rng.choice([drop_http, drop_grpc]), rng.randint(0, 8)) for _ in range(200)]
    with ThreadPoolExecutor(20) as pool:
        for result in [pool.submit(fn, n) for fn, n in jobs]:
            result.result()
    stats = stack.wait_until_idle()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["worker_kv_blocks_used"] == 0
    # Nearly all were dropped mid-job (a job can finish or never reach the scheduler first).
    assert stats["cancelled_jobs"] - before["cancelled_jobs"] >= 150


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move_after_requests(stack, oai):
    _, before = get(stack, "/metrics")
    for _ in range(3):
        oai.completions.create(
            model=stack.model,
            prompt="Hi",
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    post(stack, "/v1/completions", {"prompt": "hi", "n": 3})
    _, after = get(stack, "/metrics")
    assert metric(after, "fastserve_scheduler_up") == 1
    for name in [
        "fastserve_time_to_first_token_seconds_count",
        "fastserve_e2e_request_latency_seconds_count",
        "fastserve_time_per_output_token_seconds_count",
    ]:
        assert metric(after, name) == metric(before, name) + 3, name
    reasons = 'fastserve_requests_total{finish_reason="length"}'
    assert metric(after, reasons) == metric(before, reasons) + 3
    assert metric(after, "fastserve_generation_tokens_total") >= 12 + metric(
        before, "fastserve_generation_tokens_total"
    )
    assert metric(after, "fastserve_scheduler_finished_jobs_total") >= 3 + metric(
        before, "fastserve_scheduler_finished_jobs_total"
    )
    bad = 'fastserve_http_responses_total{route="/v1/completions",status="400"}'
    assert metric(after, bad) == metric(before, bad) + 1
    assert metric(after, "fastserve_scheduler_kv_blocks_total") > 0
    assert metric(after, "fastserve_requests_in_flight") == 0


@pytest.fixture(scope="module")
def keyed_stack(tiny_model_dir):
    # Inherited by the frontend, which reads both (`fastserve up` has no flags for them).
    os.environ["FASTSERVE_API_KEY"] = API_KEY
    os.environ["FASTSERVE_MAX_QUEUED_REQUESTS"] = str(MAX_QUEUED)
    try:
        stack = Stack.start(
            tiny_model_dir, "--http-port", "0", "--num-blocks", "64", "--max-batch-size", "1"
        )
    finally:
        del os.environ["FASTSERVE_API_KEY"], os.environ["FASTSERVE_MAX_QUEUED_REQUESTS"]
    stack.http = http_address(stack)
    stack.model = tiny_model_dir.name
    yield stack
    assert stack.stop() == 0, "".join(stack.output[-40:])


def test_api_keys_are_enforced_on_http_and_grpc(keyed_stack):
    url = f"http://{keyed_stack.http}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    status, body = post(keyed_stack, "/v1/completions", {"prompt": "hi"})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    good = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    assert good.completions.create(model=keyed_stack.model, prompt="Hi", max_tokens=2).usage
    for path in ["/health", "/ready", "/metrics"]:
        assert get(keyed_stack, path)[0] == 200, path

    from fastserve_client import errors as sdk_errors

    for key in [None, "wrong"]:
        with (
            Client(keyed_stack.address, api_key=key) as client,
            pytest.raises(sdk_errors.FastServeError) as info,
        ):
            client.complete("hi", max_tokens=2)
        assert "API key" in str(info.value)
    with grpc.insecure_channel(keyed_stack.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert is_serving(keyed_stack.address)  # health stays open
    with Client(keyed_stack.address, api_key=API_KEY) as client:
        assert client.complete("hi", max_tokens=2).usage.completion_tokens >= 1


def test_a_full_queue_answers_429_and_resource_exhausted(keyed_stack):
    from fastserve_client import errors as sdk_errors

    url = f"http://{keyed_stack.http}/v1"
    good = openai.OpenAI(base_url=url, api_key=API_KEY, max_retries=0)
    long = dict(
        model=keyed_stack.model, prompt="Go", max_tokens=300, extra_body={"ignore_eos": True}
    )
    streams = [good.completions.create(stream=True, **long) for _ in range(MAX_QUEUED)]
    for stream in streams:
        next(iter(stream))  # both admitted and running
    with pytest.raises(openai.RateLimitError) as info:
        good.completions.create(**long)
    assert info.value.status_code == 429
    with (
        Client(keyed_stack.address, api_key=API_KEY) as client,
        pytest.raises(sdk_errors.ResourceExhaustedError) as grpc_info,
    ):
        client.complete("hi", max_tokens=2)
    assert grpc_info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for stream in streams:
        stream.close()
    keyed_stack.wait_until_idle()
    assert good.completions.create(model=keyed_stack.model, prompt="Hi", max_tokens=2).usage
