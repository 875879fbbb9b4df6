"""One SSE chunk and one gRPC message per generated token, end to end (issue 14): sixteen
concurrent streams on `fastserve up` with the tiny model, ignore_eos, as a benchmark sends them.

The scheduler batches one message per iteration for all of a frontend's jobs; the frontend fans
that out as one chunk per token. The only tokens that share a chunk are those whose text the
frontend holds back: the bytes of a character split over several byte-level tokens (the tiny
model, with random weights, often emits such bytes) go out with the token that completes them.
"""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastserve_client import Chunk, Client
from testing.stack import Stack
from tests.e2e.test_openai import http_address

pytestmark = [pytest.mark.e2e]

NUM_STREAMS = 16
MAX_TOKENS = 40
PROMPTS = [f"Story number {i}:" for i in range(NUM_STREAMS)]


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    stack = Stack.start(tiny_model_dir, "--http-port", "0", "--max-batch-size", "16")
    stack.http = http_address(stack)
    yield stack
    assert stack.stop() == 0, "".join(stack.output[-40:])


def expected_groups(tokenizer, ids: list[int]) -> list[list[int]]:
    """The token ids of each chunk: a token whose text so far ends in an incomplete character
    is held back and joins the next token's chunk; every other token has a chunk of its own
    (the last one always: the end of the stream flushes whatever is held)."""
    groups: list[list[int]] = [[]]
    for k, token in enumerate(ids):
        groups[-1].append(token)
        text = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        if k == len(ids) - 1 or not text.endswith("\ufffd"):
            groups.append([])
    return groups[:-1]


def grpc_stream(stack, prompt: str) -> list[Chunk]:
    """The SDK's chunks of one greedy generation, with logprobs."""
    with Client(stack.address) as client:
        stream = client.generate(
            prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=1
        )
        return [chunk for chunk in stream if chunk.state is None]


def sse_stream(stack, prompt: str, **extra) -> list[dict]:
    """The data events of one streamed /v1/completions, parsed (without the final [DONE])."""
    body = {
        "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}, **extra,
    }  # fmt: skip
    request = urllib.request.Request(
        f"http://{stack.http}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if line.startswith(b"data: "):
                events.append(line[6:].decode().strip())
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def concurrently(fn, stack, **extra) -> list:
    """`fn(stack, prompt, **extra)` for every prompt, all at once; results in prompt order."""
    with ThreadPoolExecutor(NUM_STREAMS) as pool:
        return list(pool.map(lambda prompt: fn(stack, prompt, **extra), PROMPTS))


@pytest.fixture(scope="module")
def grpc_streams(stack) -> list[list[Chunk]]:
    return concurrently(grpc_stream, stack)


def test_grpc_sends_one_message_per_token(grpc_streams, tiny_tokenizer):
    for chunks in grpc_streams:
        ids = [token for chunk in chunks for token in chunk.token_ids]
        assert chunks[-1].usage is not None
        assert len(ids) == chunks[-1].usage.completion_tokens == MAX_TOKENS
        groups = expected_groups(tiny_tokenizer, ids)
        # One message per token, except that held-back tokens ride with the next one.
        assert [chunk.token_ids for chunk in chunks] == groups
        assert len(chunks) == MAX_TOKENS - sum(len(group) - 1 for group in groups)
        # Each message carries its tokens' text, and one logprob per token.
        for chunk in chunks:
            assert chunk.text == tiny_tokenizer.decode(chunk.token_ids, skip_special_tokens=True)
            assert [lp.token_id for lp in chunk.logprobs] == chunk.token_ids


def test_sse_sends_one_chunk_per_token(stack, grpc_streams):
    for prompt, events, reference in zip(
        PROMPTS, concurrently(sse_stream, stack), grpc_streams, strict=True
    ):
        *chunks, usage = events
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == MAX_TOKENS
        texts = [chunk["choices"][0]["text"] for chunk in chunks]
        assert "".join(texts) == "".join(c.text for c in reference), prompt  # greedy: the same
        # One chunk per completion token, less the held-back ones (the gRPC stream's grouping,
        # checked against the tokenizer above); all carry text but a special token's.
        held = sum(len(c.token_ids) - 1 for c in reference)
        assert len(chunks) == MAX_TOKENS - held, prompt
        assert [bool(t) for t in texts] == [bool(c.text) for c in reference], prompt
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_sse_logprobs_have_one_entry_per_token(stack, grpc_streams):
    for prompt, events, reference in zip(
        PROMPTS, concurrently(sse_stream, stack, logprobs=1), grpc_streams, strict=True
    ):
        *chunks, usage = events
        entries = [chunk["choices"][0]["logprobs"]["token_logprobs"] for chunk in chunks]
        assert [len(e) for e in entries] == [len(c.token_ids) for c in reference], prompt
        assert sum(len(e) for e in entries) == usage["usage"]["completion_tokens"] == MAX_TOKENS
        expected = [lp.logprob for c in reference for lp in c.logprobs]
        assert [v for e in entries for v in e] == pytest.approx(expected, abs=1e-4), prompt
