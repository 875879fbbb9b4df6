"""The serving forward's logits against Hugging Face's, row for row, on random weights.

Each family's config runs steps that mix whole prefills, chunked prefills (a chunk starting
mid-prompt attends to what earlier chunks left in the pool) and decodes of different context
lengths in one batch; every row's logits must equal those of HF's cache-free forward over the
same tokens. Sliding-window configs use a window shorter than the contexts, so it matters.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from services.worker.batch import SeqChunk
from services.worker.model_runner import ModelRunner
from tests.worker.test_model_runner import scaled_tiny_model

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "llama-tied-mha": lambda: LlamaConfig(
        **{**COMMON, "num_key_value_heads": 4, "tie_word_embeddings": True}
    ),
    "qwen2": lambda: Qwen2Config(**COMMON),
    # Layers from max_window_layers on slide: one full and two sliding layers.
    "qwen2-sliding": lambda: Qwen2Config(
        **COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=1
    ),
    "mistral-sliding": lambda: MistralConfig(**COMMON, head_dim=32, sliding_window=7),
}

# (job, tokens run this step): prompts whole or in chunks, then decodes, in mixed steps.
PROMPT_LENS = {"a": 21, "b": 5, "c": 34, "d": 12}
SCHEDULE = [
    [("a", 8), ("b", 5)],
    [("a", 8), ("b", 1), ("c", 16)],
    [("b", 1), ("a", 5), ("c", 16), ("d", 12)],
    [("c", 2), ("a", 1), ("b", 1), ("d", 1)],
    [("d", 1), ("c", 1), ("a", 1), ("b", 1)],
]


def hf_logits(model, token_ids: list[int], start: int, end: int) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(torch.tensor([token_ids[:end]])).logits
    return logits[0, start:end].float()


@pytest.mark.parametrize("backend", ["cpu-kernel", "reference"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_rows_logits_match_hf_on_mixed_steps(family, backend):
    config = CONFIGS[family]()
    model = scaled_tiny_model(config)
    rng = random.Random(7)
    # Every job's whole token sequence (prompt, then the tokens it "decodes") fixed up front.
    tokens = {job: [rng.randrange(VOCAB) for _ in range(40)] for job in PROMPT_LENS}
    block_size = 4
    free = list(range(48))
    rng.shuffle(free)
    blocks = {job: [free.pop() for _ in range(11)] for job in PROMPT_LENS}
    runner = ModelRunner(model, num_blocks=48, block_size=block_size, attention_backend=backend)
    assert runner.ops.name == ("native" if backend == "cpu-kernel" else "torch")
    done = dict.fromkeys(PROMPT_LENS, 0)
    num_decodes = num_chunks_mid_prompt = 0
    for step in SCHEDULE:
        chunks = []
        for job, count in step:
            start = done[job]
            chunks.append(
                SeqChunk(job, tokens[job][start : start + count], start, blocks[job], True)
            )
            num_decodes += count == 1 and start >= PROMPT_LENS[job]
            num_chunks_mid_prompt += count > 1 and start > 0
        inputs = runner.prepare(chunks)
        with torch.inference_mode():
            hidden = runner.run_layers(runner.embed(inputs), inputs)
            ours = runner.model.logits(hidden)
        row = 0
        for chunk in chunks:
            expected = hf_logits(model, tokens[chunk.job_id], chunk.start_pos, chunk.end_pos)
            got = ours[row : row + chunk.num_tokens]
            torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
            row += chunk.num_tokens
            done[chunk.job_id] = chunk.end_pos
    assert num_decodes >= 8 and num_chunks_mid_prompt >= 3
    # The windows really cut: a context longer than every window was attended.
    assert max(done.values()) > 2 * (getattr(config, "sliding_window", None) or 0)
