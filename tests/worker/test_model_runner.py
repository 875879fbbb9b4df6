"""ModelRunner against transformers: greedy tokens from our paged-attention forward, driven by a
small scheduler loop (jobs joining while others decode, chunked prefill, shuffled and reused
blocks), must equal `model.generate` on the same weights."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from services.common.model_source import load_model, resolve_model
from services.common.sampling import GREEDY, SamplingParams
from services.worker.batch import SeqChunk
from services.worker.model_runner import ModelRunner
from services.worker.sampler import sample
from testing.oracle import assert_greedy_matches, hf_greedy, hf_next_logits
from testing.tiny_model import tiny_llama_dir

# The last job joins after the first has finished, so it runs on that job's freed blocks.
PROMPT_LENS = (1, 9, 23, 40, 17, 12)
JOIN_STEPS = (0, 0, 1, 3, 6, 11)
NUM_NEW = 10


@dataclass(slots=True)
class _Job:
    job_id: str
    prompt: list[int]
    join_step: int
    output: list[int] = field(default_factory=list)
    num_cached: int = 0
    block_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Trace:
    outputs: list[list[int]]
    num_mixed_steps: int = 0  # steps running a prefill chunk and a decode together
    num_chunked: int = 0  # chunks that did not sample (non-final prompt chunks)
    num_reused: int = 0  # blocks handed out again after a finished job freed them


def drive(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    *,
    num_new: int = NUM_NEW,
    chunk_size: int | None = None,
    join_steps: Sequence[int] | None = None,
    sampling: SamplingParams = GREEDY,
    seed: int = 0,
) -> _Trace:
    """Runs prompts to `num_new` tokens each the way a scheduler would: jobs join at their step,
    long prompts go in chunks, blocks come from a shuffled free list, and freed blocks are
    handed out first, so stale K/V from finished jobs sits in blocks that new jobs reuse."""
    rng = random.Random(seed)
    free = list(range(runner.num_blocks))
    rng.shuffle(free)
    joins = join_steps or [0] * len(prompts)
    jobs = [
        _Job(f"job-{i}", list(p), j) for i, (p, j) in enumerate(zip(prompts, joins, strict=True))
    ]
    trace = _Trace(outputs=[])
    used: set[int] = set()
    step = 0
    while any(len(job.output) < num_new for job in jobs):
        active = [j for j in jobs if j.join_step <= step and len(j.output) < num_new]
        chunks = []
        for job in active:
            if job.num_cached < len(job.prompt):
                end = len(job.prompt) if chunk_size is None else job.num_cached + chunk_size
                tokens = job.prompt[job.num_cached : end]
            else:
                tokens = [job.output[-1]]
            end_pos = job.num_cached + len(tokens)
            while len(job.block_ids) * runner.block_size < end_pos:
                block_id = free.pop()
                trace.num_reused += block_id in used
                used.add(block_id)
                job.block_ids.append(block_id)
            sample = end_pos >= len(job.prompt)
            chunks.append(
                SeqChunk(job.job_id, tokens, job.num_cached, job.block_ids, sample, sampling)
            )
        is_prefill = [c.end_pos <= len(j.prompt) for c, j in zip(chunks, active, strict=True)]
        trace.num_mixed_steps += any(is_prefill) and not all(is_prefill)
        trace.num_chunked += sum(not c.sample for c in chunks)
        for job, chunk, token in zip(active, chunks, runner.step(chunks), strict=True):
            assert (token is None) == (not chunk.sample)
            job.num_cached = chunk.end_pos
            if token is not None:
                job.output.append(token)
            if len(job.output) == num_new:
                rng.shuffle(job.block_ids)
                free.extend(job.block_ids)  # popped first
        step += 1
    trace.outputs = [job.output for job in jobs]
    return trace


def make_prompts(
    vocab_size: int, lens: Sequence[int] = PROMPT_LENS, seed: int = 1
) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lens]


def check_against_hf(model, prompts, outputs, *, tie_tolerance: float = 1e-3) -> None:
    for prompt, ours in zip(prompts, outputs, strict=True):
        ref = hf_greedy(model, prompt, len(ours))
        assert_greedy_matches(model, prompt, ours, ref, tie_tolerance=tie_tolerance)


def scaled_tiny_model(config, seed: int = 0):
    """A random tiny model whose logits spread out, so greedy picks are rarely near-ties."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Qwen2's q/k/v biases start at zero; drawn too, so a dropped bias shows.
            if param.dim() > 1 or name.endswith("bias"):
                param.normal_(0.0, 0.2)
    return model.eval()


# The Triton kernels run in Triton's interpreter here (about 17 s a case): one case, the block
# size and chunking that cross the most block boundaries.
@pytest.mark.parametrize(
    ("backend", "block_size", "chunk_size"),
    [
        (backend, *sizes)
        for backend in ("cpu-kernel", "reference")
        for sizes in [(16, None), (16, 8), (5, None), (3, 7)]
    ]
    + [("triton", 3, 7)],
    ids=str,
)
def test_concurrent_jobs_match_hf(
    llama, llama_prompts, llama_refs, block_size, chunk_size, backend
):
    runner = ModelRunner(llama, num_blocks=64, block_size=block_size, attention_backend=backend)
    assert runner.attention.name == backend
    trace = drive(runner, llama_prompts, chunk_size=chunk_size, join_steps=JOIN_STEPS)
    assert trace.num_mixed_steps > 0
    assert trace.num_reused > 0
    if chunk_size is not None:
        assert trace.num_chunked > 0
    for prompt, ours, ref in zip(llama_prompts, trace.outputs, llama_refs, strict=True):
        assert_greedy_matches(llama, prompt, ours, ref)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("family", ["qwen2", "mistral", "mistral-sliding"])
def test_other_families_match_hf(family, backend):
    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if family == "qwen2":
        config = Qwen2Config(**common)
    else:
        # head_dim 32 != hidden / heads exercises config.head_dim and HF's scaling from it.
        window = 8 if family == "mistral-sliding" else None
        config = MistralConfig(**common, head_dim=32, sliding_window=window)
    model = scaled_tiny_model(config)
    prompts = make_prompts(512, lens=(5, 19, 12))
    runner = ModelRunner(model, num_blocks=32, block_size=4, attention_backend=backend)
    trace = drive(runner, prompts, chunk_size=6, join_steps=(0, 1, 2))
    check_against_hf(model, prompts, trace.outputs)


# Half-precision logits near 8 are spaced 1/32 (bf16) or 1/128 (fp16) apart: exact ties happen,
# so a tie is a few spacings; first tokens whose float32 top-2 gap exceeds that noise must agree
# with float32 too (not both wrong alike: an overflow gives HF and us the same garbage).
@pytest.mark.parametrize(
    ("dtype", "tie_tolerance", "float32_gap"),
    [(torch.bfloat16, 0.1, 0.05), (torch.float16, 0.03, 0.02)],
    ids=["bfloat16", "float16"],
)
def test_half_precision_matches_hf_and_starts_like_float32(
    llama, llama_prompts, llama_refs, dtype, tie_tolerance, float32_gap
):
    model = load_model(resolve_model(str(tiny_llama_dir())), dtype=dtype)
    runner = ModelRunner(model, num_blocks=64, block_size=16)
    assert runner.kv_cache.dtype == dtype
    trace = drive(runner, llama_prompts, join_steps=JOIN_STEPS)
    check_against_hf(model, llama_prompts, trace.outputs, tie_tolerance=tie_tolerance)
    for prompt, ours, ref in zip(llama_prompts, trace.outputs, llama_refs, strict=True):
        top2 = hf_next_logits(llama, prompt).topk(2).values
        if top2[0] - top2[1] > float32_gap:
            assert ours[0] == ref[0]


def test_seeded_sampling_is_keyed_by_position_not_batch(llama, llama_prompts):
    """Seeded random sampling gives the same tokens whatever the batch, block size or chunking,
    and the first token is what the sampler draws from HF's logits at that position."""
    sampling = SamplingParams(temperature=1.5, top_p=0.9, seed=1234)
    prompts = llama_prompts[1:4]
    alone = [
        drive(ModelRunner(llama, num_blocks=16, block_size=16), [p], sampling=sampling).outputs[0]
        for p in prompts
    ]
    together = drive(
        ModelRunner(llama, num_blocks=64, block_size=5),
        prompts,
        chunk_size=6,
        join_steps=(0, 2, 3),
        sampling=sampling,
    ).outputs
    assert together == alone
    for prompt, output in zip(prompts, alone, strict=True):
        logits = hf_next_logits(llama, prompt)[None]
        assert output[0] == sample(logits, [sampling], [len(prompt)])[0]
    assert len({t for out in alone for t in out}) > NUM_NEW  # really random, not greedy


def test_moved_blocks_continue_identically(llama, llama_prompts, llama_refs):
    """Swap out / swap in: a job's blocks copied elsewhere through read_blocks/write_blocks
    (via host memory) decode exactly as if they had never moved."""
    prompt, ref = llama_prompts[3], llama_refs[3]  # 40 + 9 tokens: 4 blocks of 16
    runner = ModelRunner(llama, num_blocks=16, block_size=16)
    blocks = [2, 9, 4, 13]
    output = runner.step([SeqChunk("a", prompt, 0, blocks, True, GREEDY)])
    saved = runner.kv_cache.read_blocks(blocks, device="cpu")
    runner.reset()
    moved = [11, 0, 7, 2]
    runner.kv_cache.write_blocks(moved, saved)
    for i in range(NUM_NEW - 1):
        output += runner.step([SeqChunk("a", [output[-1]], len(prompt) + i, moved, True, GREEDY)])
    assert_greedy_matches(llama, prompt, output, ref)


def test_pipeline_stages_match_one_runner(llama, llama_prompts):
    """Two runners holding layers [0, 2) and [2, 4) chained by hand give the whole model's
    logits: the staged API is enough for a pipeline-parallel worker."""
    prompt = llama_prompts[2]
    chunk = [SeqChunk("a", prompt, 0, [3, 1], True, GREEDY)]
    whole = ModelRunner(llama, num_blocks=4, block_size=16)
    first = ModelRunner(llama, num_blocks=4, block_size=16, layers=range(0, 2))
    last = ModelRunner(llama, num_blocks=4, block_size=16, layers=range(2, 4))
    assert first.block_bytes * 2 == whole.block_bytes
    inputs = whole.prepare(chunk)
    expected = whole.compute_logits(whole.run_layers(whole.embed(inputs), inputs), inputs)
    hidden = first.run_layers(first.embed(inputs), inputs)
    logits = last.compute_logits(last.run_layers(hidden, inputs), inputs)
    torch.testing.assert_close(logits, expected)
    with pytest.raises(RuntimeError):
        first.step(chunk)


def test_rejects_short_or_foreign_block_tables(llama):
    runner = ModelRunner(llama, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="cannot hold"):
        runner.step([SeqChunk("a", [5] * 5, 0, [0], True, GREEDY)])
    with pytest.raises(ValueError, match="out of"):
        runner.step([SeqChunk("a", [5] * 3, 0, [4], True, GREEDY)])


def test_block_bytes_match_the_pool(llama):
    runner = ModelRunner(llama, num_blocks=3, block_size=16)
    config = llama.config
    expected = ModelRunner.bytes_per_block(config, 16, torch.float32)
    # the pool holds the 3 blocks jobs use and the runner's scratch block
    assert runner.block_bytes == expected == runner.kv_cache.data.nbytes // 4
    assert runner.kv_cache.scratch_block == 3
    # 4 layers x K,V x 16 positions x 2 KV heads x head_dim 16 x 4 bytes
    assert expected == 4 * 2 * 16 * 2 * 16 * 4


def test_kv_blocks_round_trip():
    from services.worker.kv_cache import KVCache

    cache = KVCache(
        num_blocks=6, block_size=4, num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float16
    )
    cache.data.normal_()
    before = cache.data.clone()
    blocks = cache.read_blocks([4, 1])
    assert blocks.shape == (2, 3, 2, 4, 2, 8)
    torch.testing.assert_close(blocks[0], before[4], rtol=0, atol=0)
    blocks_copy = blocks.clone()
    cache.data.zero_()  # the copy must not alias the pool
    torch.testing.assert_close(blocks, blocks_copy, rtol=0, atol=0)
    cache.write_blocks([0, 5], blocks)
    torch.testing.assert_close(cache.data[0], before[4], rtol=0, atol=0)
    torch.testing.assert_close(cache.data[5], before[1], rtol=0, atol=0)
    assert not cache.data[1:5].any()
    with pytest.raises(ValueError):
        cache.write_blocks([0], blocks)


def test_reset_then_rerun_gives_same_tokens(llama, llama_prompts):
    runner = ModelRunner(llama, num_blocks=64, block_size=8)
    first = drive(runner, llama_prompts[:3], num_new=4).outputs
    runner.reset()
    assert not runner.kv_cache.data.any()
    assert drive(runner, llama_prompts[:3], num_new=4, seed=3).outputs == first
