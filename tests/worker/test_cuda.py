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


def test_captured_decode_graphs_match_transformers(tiny_model_dir, tiny_tokenizer):
    """Triton kernels compiled for the GPU and decode steps replayed from CUDA graphs: jobs of
    different lengths decode together (buckets 1, 2, 4 padded) and each greedy output is
    transformers'."""
    model = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.float32, device="cuda")
    runner = ModelRunner(model, num_blocks=64, block_size=16, graph_max_batch=4)
    assert runner.attention.name == "triton" and runner.graphs is not None
    assert all(b.graph is not None for b in runner.graphs.buckets.values())
    prompts = [
        tiny_tokenizer(p)["input_ids"]
        for p in ["Hello there", "The capital of France is a city called", "One two three"]
    ]
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(prompts))]
    seqs = [SeqChunk(f"j{i}", p, 0, tables[i], True) for i, p in enumerate(prompts)]
    tokens = runner.step(seqs)
    outputs = [[t] for t in tokens]
    for _ in range(15):
        seqs = [
            SeqChunk(f"j{i}", [out[-1]], len(p) + len(out) - 1, tables[i], True)
            for i, (p, out) in enumerate(zip(prompts, outputs, strict=True))
        ]
        for out, token in zip(outputs, runner.step(seqs), strict=True):
            out.append(token)
    assert runner.graphs.num_replays == 15
    for prompt, out in zip(prompts, outputs, strict=True):
        assert_greedy_matches(model, prompt, out, hf_greedy(model, prompt, len(out)))


def test_graphs_refuse_the_reference_backend(tiny_model_dir):
    model = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match="triton attention backend"):
        ModelRunner(
            model, num_blocks=8, block_size=16, attention_backend="reference", graph_max_batch=2
        )
