"""Logprobs end to end: OpenAI HTTP (completions and chat, streaming and not), gRPC and the SDK,
checked against transformers' own log_softmax."""

from __future__ import annotations

import grpc
import openai
import pytest
import torch

from fastserve.v1 import generation_pb2 as pb
from fastserve.v1 import generation_pb2_grpc
from fastserve_client import Client
from testing.stack import Stack
from tests.e2e.test_openai import http_address

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    stack = Stack.start(tiny_model_dir, "--http-port", "0", "--num-blocks", "128")
    stack.http = http_address(stack)
    stack.model = tiny_model_dir.name
    yield stack
    assert stack.stop() == 0, "".join(stack.output[-40:])


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=f"http://{stack.http}/v1", api_key="unused", max_retries=0)


def test_completion_logprobs_match_the_models_distribution(oai, stack, tiny_hf_model):
    """logprobs = 3 on /v1/completions: the sampled token's logprob and 3 alternatives, equal
    to log_softmax of transformers' own logits, streaming or not."""
    result = oai.completions.create(
        model=stack.model, prompt="The sea is", max_tokens=6, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == result.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and chosen <= 0
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy picks the top
    streamed = oai.completions.create(
        model=stack.model, prompt="The sea is", max_tokens=6, temperature=0, logprobs=3,
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [v for c in chunks for v in c.token_logprobs] == pytest.approx(lp.token_logprobs)


def test_chat_logprobs_equal_the_reference_log_softmax(oai, stack, tiny_hf_model, tiny_tokenizer):
    from services.frontend.tokenizer import ChatTurn, encode_chat
    from testing.oracle import hf_next_logits

    messages = [{"role": "user", "content": "Name a colour."}]
    result = oai.chat.completions.create(
        model=stack.model, messages=messages, max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = result.choices[0].logprobs.content
    assert len(content) == 5
    prompt_ids = encode_chat(tiny_tokenizer, [ChatTurn("user", "Name a colour.")])
    ids = list(prompt_ids)
    for entry in content:
        reference = torch.log_softmax(hf_next_logits(tiny_hf_model, ids), -1)
        token_id = int(reference.argmax())
        assert entry.logprob == pytest.approx(float(reference[token_id]), abs=1e-3)
        assert entry.token == tiny_tokenizer.decode([token_id])
        assert bytes(entry.bytes) == entry.token.encode()
        top_ids = reference.topk(2).indices.tolist()
        assert [t.token for t in entry.top_logprobs] == [
            tiny_tokenizer.decode([t]) for t in top_ids
        ]
        ids.append(token_id)
    plain = oai.chat.completions.create(
        model=stack.model, messages=messages, max_tokens=5, temperature=0
    )
    assert plain.choices[0].logprobs is None


def test_grpc_returns_logprobs_per_token(stack):
    with grpc.insecure_channel(stack.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(
            prompt="Hello", max_tokens=4, temperature=0, ignore_eos=True, logprobs=True,
            top_logprobs=4,
        )  # fmt: skip
        responses = list(stub.Generate(request, timeout=60))
        tokens = [t for r in responses for t in r.token_ids]
        logprobs = [lp for r in responses for lp in r.logprobs]
        assert len(tokens) == len(logprobs) == 4
        for token, lp in zip(tokens, logprobs, strict=True):
            assert len(lp.top) == 4 and lp.top[0].token_id == token
            assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
    with Client(stack.address) as client:  # the SDK: Completion.logprobs, one per token
        done = client.complete("Hello", max_tokens=4, temperature=0, ignore_eos=True, logprobs=4)
    assert done.token_ids == tokens
    assert [lp.logprob for lp in done.logprobs] == pytest.approx([lp.logprob for lp in logprobs])
    assert [lp.top[0][0] for lp in done.logprobs] == tokens
    with grpc.insecure_channel(stack.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt="x", top_logprobs=2), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "top_logprobs" in info.value.details()
