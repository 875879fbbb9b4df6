"""The CPU paged-attention kernel against the reference (gather + SDPA), and the fallback."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from services.worker import native
from services.worker.attention import PagedAttention, cpu_kernel
from services.worker.attention.metadata import AttentionMetadata
from services.worker.attention.reference import reference_attention


def make_step(query_lens, seq_lens, *, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """A pool [blocks, layers, 2, block_size, kv_heads, head_dim] of random K/V, shuffled block
    tables, and a query that is a strided view of a fused QKV output, as the model passes it."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    pool = torch.randn(num_blocks, 2, 2, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        query_start=torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        slot_blocks=torch.empty(0, dtype=torch.int32),
        slot_offsets=torch.empty(0, dtype=torch.int32),
        query_lens_host=tuple(query_lens),
        seq_lens_host=tuple(seq_lens),
    )
    qkv = torch.randn(sum(query_lens), heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    return qkv[:, :heads], pool[:, 1, 0], pool[:, 1, 1], meta


CASES = {
    "decodes": dict(query_lens=[1] * 5, seq_lens=[1, 7, 16, 33, 90]),
    "mixed": dict(query_lens=[1, 13, 1, 40, 2], seq_lens=[50, 13, 9, 70, 31]),
    "long-prefill": dict(query_lens=[130], seq_lens=[130]),
}


# Head layouts and block sizes every kernel is checked on: GQA 3 and 4, MHA; head dims 64, 32, 80.
SHAPES = pytest.mark.parametrize(
    "shape",
    [(9, 3, 64, 16), (4, 4, 32, 5), (8, 2, 80, 1)],
    ids=["gqa3-d64-bs16", "mha-d32-bs5", "gqa4-d80-bs1"],
)


def float32_step(case: str, shape: tuple[int, int, int, int]):
    heads, kv_heads, head_dim, block_size = shape
    return make_step(
        **CASES[case],
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=torch.float32,
    )


@pytest.mark.parametrize("window", [None, 1, 6, 29])
@pytest.mark.parametrize("case", sorted(CASES))
@SHAPES
def test_kernel_matches_reference(case, window, shape):
    kernel = cpu_kernel.load()
    assert kernel is not None, "the CPU kernel must build where the tests run"
    query, keys, values, meta = float32_step(case, shape)
    expected = reference_attention(query, keys, values, meta, scale=0.1, window=window)
    got = kernel(kernel.plan(meta), query, keys, values, scale=0.1, window=window)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)], ids=str
)
def test_kernel_half_precision_within_rounding(dtype, tolerance):
    kernel = cpu_kernel.load()
    assert kernel is not None
    query, keys, values, meta = make_step(
        **CASES["mixed"], heads=9, kv_heads=3, head_dim=64, block_size=16, dtype=dtype
    )
    expected = reference_attention(
        query.float(), keys.float(), values.float(), meta, scale=0.125, window=None
    )
    got = kernel(kernel.plan(meta), query, keys, values, scale=0.125, window=None)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


def test_kernel_refuses_what_it_cannot_read():
    kernel = cpu_kernel.load()
    assert kernel is not None
    query, keys, values, meta = make_step(
        **CASES["decodes"], heads=4, kv_heads=2, head_dim=32, block_size=4, dtype=torch.float32
    )
    plan = kernel.plan(meta)
    with pytest.raises(ValueError, match="dense"):
        kernel(plan, query.transpose(1, 2), keys, values, scale=1.0, window=None)
    with pytest.raises(ValueError, match="one dtype"):
        kernel(plan, query.half(), keys, values, scale=1.0, window=None)
    with pytest.raises(ValueError, match="not supported"):
        kernel(plan, query.double(), keys.double(), values.double(), scale=1.0, window=None)


def test_without_a_compiler_auto_falls_back_and_explicit_refuses(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / c++ either
    with pytest.raises(RuntimeError, match="compiler"):
        native.build()
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)
    heads = dict(num_heads=4, num_kv_heads=2)
    assert PagedAttention("auto", torch.device("cpu"), **heads).name == "reference"
    with pytest.raises(ValueError, match="could not be built"):
        PagedAttention("cpu-kernel", torch.device("cpu"), **heads)
    with pytest.raises(ValueError, match="must be one of"):
        PagedAttention("flash", torch.device("cpu"), **heads)
