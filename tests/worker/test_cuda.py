"""The worker's model runner on CUDA: greedy output equals transformers' on the same device.
Skipped without a GPU (CI has none)."""

import pytest
import torch

from services.common.model_source import load_model, resolve_model
from services.worker.batch import SeqChunk
from services.worker.model_runner import ModelRunner
from testing.oracle import assert_greedy_matches, hf_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("dtype", [torch.float32])
def test_greedy_decode_on_cuda_matches_transformers(tiny_model_dir, tiny_tokenizer, dtype):
    model = load_model(resolve_model(str(tiny_model_dir)), dtype=dtype, device="cuda")
    runner = ModelRunner(model, num_blocks=64, block_size=16)
    prompts = ["Hello there", "The capital of France is a city called"]
    for i, prompt in enumerate(prompts):
        prompt_ids = tiny_tokenizer(prompt)["input_ids"]
        blocks = list(range(i * 8, i * 8 + 8))
        tokens = list(prompt_ids)
        out = []
        (token,) = runner.step([SeqChunk(f"j{i}", tokens, 0, blocks, True)])
        for _ in range(15):
            out.append(token)
            (token,) = runner.step([SeqChunk(f"j{i}", [token], len(tokens), blocks, True)])
            tokens.append(out[-1])
        out.append(token)
        ref = hf_greedy(model, prompt_ids, len(out))
        assert_greedy_matches(model, prompt_ids, out, ref)
