"""Decode steps in graph buckets: padded into static buffers, the same tokens as eager steps.

Without CUDA the runner runs a bucket's padded step eagerly (capture_graphs=False), which checks
everything but the recording: bucket choice, padding rows on the scratch block, the static
buffers, a later stage's hidden states in. test_cuda.py replays real graphs on a GPU."""

from __future__ import annotations

import pytest
import torch

from services.worker.batch import SeqChunk
from services.worker.cuda_graphs import bucket_sizes
from services.worker.model_runner import ModelRunner
from testing.oracle import assert_greedy_matches
from tests.worker.test_model_runner import JOIN_STEPS, drive


@pytest.mark.parametrize(
    ("max_batch", "sizes"),
    [(1, [1]), (3, [1, 2, 3]), (16, [1, 2, 4, 8, 16]), (20, [1, 2, 4, 8, 16, 20])],
)
def test_bucket_sizes(max_batch, sizes):
    assert bucket_sizes(max_batch) == sizes
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


@pytest.mark.parametrize("backend", ["cpu-kernel", "triton"])
def test_padded_decode_steps_give_the_eager_tokens(llama, llama_prompts, llama_refs, backend):
    """Jobs joining over time on shuffled, reused blocks: decode steps of up to 4 jobs run in
    buckets (padded to 1, 2 or 4), the rest eagerly; the tokens are the eager runner's and
    transformers'. (Triton's interpreter is slow: three jobs for it, six for the C++ kernel.)"""
    num_jobs = 3 if backend == "triton" else 6
    prompts, refs, joins = llama_prompts[:num_jobs], llama_refs[:num_jobs], JOIN_STEPS[:num_jobs]
    eager = ModelRunner(llama, num_blocks=64, block_size=5, attention_backend=backend)
    graphed = ModelRunner(
        llama,
        num_blocks=64,
        block_size=5,
        attention_backend=backend,
        graph_max_batch=4,
        capture_graphs=False,
    )
    assert graphed.graphs is not None and graphed.graphs.sizes == [1, 2, 4]
    expected = drive(eager, prompts, join_steps=joins).outputs
    got = drive(graphed, prompts, join_steps=joins).outputs
    assert graphed.graphs.num_replays > 5
    assert got == expected
    for prompt, ours, ref in zip(prompts, got, refs, strict=True):
        assert_greedy_matches(llama, prompt, ours, ref)


def test_which_steps_take_a_bucket(llama):
    runner = ModelRunner(
        llama,
        num_blocks=64,
        block_size=4,
        graph_max_batch=4,
        graph_max_len=16,
        capture_graphs=False,
    )
    graphs = runner.graphs
    assert graphs is not None and graphs.width == 4

    def decode(job: int, pos: int) -> SeqChunk:
        return SeqChunk(f"j{job}", [5], pos, list(range(job * 8, job * 8 + 8)), True)

    assert runner.prepare([decode(0, 3), decode(1, 9), decode(2, 0)]).bucket == 4
    assert runner.prepare([decode(0, 3)]).bucket == 1
    assert runner.prepare([decode(i, 3) for i in range(5)]).bucket is None  # over max_batch
    assert runner.prepare([decode(0, 16)]).bucket is None  # 17 tokens: over 4 blocks
    prompt = SeqChunk("p", [5, 6], 0, [60], True)
    assert runner.prepare([decode(0, 3), prompt]).bucket is None  # a prompt chunk
    assert runner.prepare([SeqChunk("c", [5], 0, [61], False)]).bucket is None  # no sample

    inputs = runner.prepare([decode(0, 3), decode(1, 9), decode(2, 0)])
    scratch = runner.kv_cache.scratch_block
    assert inputs.num_rows == 3 and inputs.token_ids.shape[0] == 4
    assert inputs.attention.block_tables.shape == (4, 4)
    assert inputs.attention.block_tables[3].tolist() == [scratch] * 4
    assert inputs.attention.slot_blocks.tolist()[3] == scratch
    assert inputs.attention.seq_lens.tolist() == [4, 10, 1, 1]
    assert inputs.sample_seqs == [0, 1, 2] and inputs.sample_rows.tolist() == [0, 1, 2, 3]
    assert runner.forward(inputs).shape == (3, llama.config.vocab_size)


def test_pipeline_stages_in_buckets_match_one_runner(llama, llama_prompts):
    """A later stage takes the previous stage's real rows; the bucket pads them."""
    whole = ModelRunner(llama, num_blocks=32, block_size=8)
    first, last = (
        ModelRunner(
            llama,
            num_blocks=32,
            block_size=8,
            layers=layers,
            graph_max_batch=4,
            capture_graphs=False,
        )
        for layers in (range(0, 2), range(2, 4))
    )
    prompts = llama_prompts[:3]
    prefill = [
        SeqChunk(f"j{i}", p, 0, list(range(i * 8, i * 8 + 8)), True) for i, p in enumerate(prompts)
    ]
    for runner in (whole, first, last):
        runner.forward(
            runner.prepare(prefill),
            None if runner is not last else first.forward(first.prepare(prefill)),
        )
    decodes = [
        SeqChunk(f"j{i}", [7], len(p), list(range(i * 8, i * 8 + 8)), True)
        for i, p in enumerate(prompts)
    ]
    expected = whole.forward(whole.prepare(decodes))
    first_inputs, last_inputs = first.prepare(decodes), last.prepare(decodes)
    assert first_inputs.bucket == last_inputs.bucket == 4
    hidden = first.forward(first_inputs)
    assert hidden.shape == (3, llama.config.hidden_size)
    torch.testing.assert_close(last.forward(last_inputs, hidden), expected)


def test_capture_needs_cuda(llama):
    with pytest.raises(ValueError, match="CUDA device"):
        ModelRunner(llama, num_blocks=8, block_size=4, graph_max_batch=2, capture_graphs=True)


@pytest.mark.parametrize("flag", ["--cuda-graph-max-batch", "--cuda-graph-max-len"])
def test_the_worker_refuses_negative_graph_settings_naming_the_flag(flag):
    import argparse

    from services.worker.main import add_arguments, check_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    check_args(parser.parse_args(["--model", "m", flag, "0"]))  # 0: graphs off / model length
    with pytest.raises(SystemExit, match=f"worker: {flag} must be >= 0, got -1"):
        check_args(parser.parse_args(["--model", "m", flag, "-1"]))


def test_padding_rows_write_only_the_scratch_block(llama):
    """Three decodes padded to bucket 4: each job's K/V lands at its own position, the padding
    row's on the scratch block, and no other byte of the pool changes."""
    runner = ModelRunner(
        llama, num_blocks=16, block_size=4, graph_max_batch=4, capture_graphs=False
    )
    cache = runner.kv_cache
    cache.data.normal_()
    before = cache.data.clone()
    seqs = [SeqChunk(f"j{i}", [5], 2, [i], True) for i in range(3)]  # position 2 of block i
    inputs = runner.prepare(seqs)
    assert inputs.bucket == 4
    runner.forward(inputs)
    changed = cache.data != before  # [blocks, layers, K/V, position, heads, dim]
    blocks = changed.flatten(1).any(1).nonzero().flatten().tolist()
    assert blocks == [0, 1, 2, cache.scratch_block]
    positions = changed[:3].transpose(0, 3).flatten(1).any(1).nonzero().flatten().tolist()
    assert positions == [2]
