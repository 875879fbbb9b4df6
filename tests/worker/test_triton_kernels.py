"""The worker's Triton kernels against the torch reference: paged attention against gather +
SDPA, the fused layer ops against TorchOps. Without CUDA they run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1); on a GPU the same tests run the compiled kernels."""

from __future__ import annotations

import pytest
import torch

from services.worker import kernels
from services.worker.attention import PagedAttention
from services.worker.attention.reference import reference_attention
from services.worker.kernels import layer_ops
from services.worker.kernels import paged_attention as triton_attention
from services.worker.models.layers import RMSNorm, RotaryTable
from services.worker.models.ops import TorchOps
from testing.tiny_model import tiny_llama_config
from tests.worker.test_attention import CASES, SHAPES, float32_step, make_step

pytestmark = pytest.mark.triton  # make gpu-check runs these on the GPU

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def _attention(query, keys, values, meta, window, scale=0.1):
    heads, kv_heads = query.shape[1], keys.shape[2]
    launch = triton_attention.plan(meta, num_heads=heads, num_kv_heads=kv_heads)
    return triton_attention.paged_attention(launch, query, keys, values, scale=scale, window=window)


def _meta_on_device(meta):
    from dataclasses import replace

    return replace(
        meta,
        query_start=meta.query_start.to(DEVICE),
        seq_lens=meta.seq_lens.to(DEVICE),
        block_tables=meta.block_tables.to(DEVICE),
    )


@pytest.mark.parametrize("window", [None, 1, 6])
@pytest.mark.parametrize("case", sorted(CASES))
@SHAPES
def test_attention_matches_reference(case, window, shape):
    query, keys, values, meta = float32_step(case, shape)
    expected = reference_attention(query, keys, values, meta, scale=0.1, window=window)
    query, keys, values = _on_device(query, keys, values)
    got = _attention(query, keys, values, _meta_on_device(meta), window)
    torch.testing.assert_close(got.cpu(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.skipif(
    DEVICE.type != "cuda", reason="Triton's interpreter multiplies bf16 matrices as integers"
)
def test_attention_in_bfloat16_within_rounding():
    query, keys, values, meta = make_step(
        **CASES["mixed"], heads=9, kv_heads=3, head_dim=64, block_size=16, dtype=torch.bfloat16
    )
    expected = reference_attention(
        query.float(), keys.float(), values.float(), meta, scale=0.125, window=None
    )
    query, keys, values = _on_device(query, keys, values)
    got = _attention(query, keys, values, _meta_on_device(meta), None, scale=0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.cpu().float(), expected, atol=2e-2, rtol=2e-2)


def test_decode_steps_of_one_batch_size_launch_one_grid():
    """What a CUDA graph needs: the launch shape of a decode step depends on its size only."""
    shapes = set()
    for lens in ([1, 7, 16, 33, 90], [300, 2, 2, 2, 2], [5, 5, 5, 5, 5]):
        *_, meta = make_step(
            query_lens=[1] * 5,
            seq_lens=lens,
            heads=8,
            kv_heads=2,
            head_dim=16,
            block_size=16,
            dtype=torch.float32,
        )
        launch = triton_attention.plan(meta, num_heads=8, num_kv_heads=2)
        shapes.add((launch.grid_rows, launch.block_q, launch.tile))
    assert len(shapes) == 1


# Triton's interpreter truncates float32 -> bfloat16 where torch (and the GPU) rounds to nearest,
# so on CPU a bf16 result may be a unit in the last place off at each rounding an op makes, and
# more where a truncated input feeds the next rounding: 3 units (2^-7 relative each) allowed;
# on a GPU, one unit (a reduction's order).
BF16_ULPS = 3 * 2.0**-7 if DEVICE.type != "cuda" else 2.0**-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_ops_match_torch_ops(dtype):
    gen = torch.Generator().manual_seed(0)
    rows, hidden, heads, kv_heads, head_dim = 7, 64, 4, 2, 16

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    tolerance = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else {}

    def close(got, expected):
        if dtype == torch.float32:
            torch.testing.assert_close(got.cpu(), expected, **tolerance)
        else:
            # atol: rotary's sums cancel, so there the rounding is the products' (inputs ~ 1)
            torch.testing.assert_close(
                got.cpu().float(), expected.float(), rtol=BF16_ULPS * 1.01, atol=2.0**-6
            )

    torch_ops = TorchOps()
    norm = RMSNorm(hidden, 1e-5, dtype=dtype, device=torch.device("cpu"))
    norm.weight.requires_grad_(False).copy_(rand(hidden))
    x, delta = rand(rows, hidden), rand(rows, hidden)
    x_ref = x.clone()
    expected = torch_ops.add_rms_norm(x_ref, delta, norm)
    (x_dev, delta_dev, weight) = _on_device(x, delta, norm.weight.data)
    got = layer_ops.add_rms_norm(x_dev, delta_dev, weight, 1e-5)
    close(x_dev, x_ref)
    close(got, expected)
    close(
        layer_ops.add_rms_norm(x_dev, None, weight, 1e-5), torch_ops.add_rms_norm(x_ref, None, norm)
    )

    gate_up = rand(rows, 2 * 96)
    close(layer_ops.silu_mul(gate_up.to(DEVICE)), torch_ops.silu_mul(gate_up))

    config = tiny_llama_config(100, num_attention_heads=heads, num_key_value_heads=kv_heads)
    rotary = RotaryTable(config, dtype=dtype, device=torch.device("cpu"))
    qkv = rand(rows, heads + 2 * kv_heads, head_dim)
    positions = torch.tensor([0, 5, 9, 100, 3, 4, 511], dtype=torch.int32)
    slots = (
        torch.tensor([1, 2, 3, 4, 5, 6, 7], dtype=torch.int32),
        torch.tensor([0, 1, 2, 3, 0, 1, 2], dtype=torch.int32),
    )
    pool = torch.zeros(10, 2, 4, kv_heads, head_dim, dtype=dtype)
    expected_query = torch_ops.rope_store(
        qkv.clone(), heads, kv_heads, positions, rotary, (pool[:, 0], pool[:, 1]), slots
    )
    pool_dev, qkv_dev, positions_dev, cos, sin = _on_device(
        torch.zeros_like(pool), qkv, positions, rotary.cos, rotary.sin
    )
    got_query = layer_ops.rope_store(
        qkv_dev,
        heads,
        kv_heads,
        positions_dev,
        cos,
        sin,
        (pool_dev[:, 0], pool_dev[:, 1]),
        tuple(s.to(DEVICE) for s in slots),
    )
    close(got_query, expected_query)
    close(pool_dev, pool)


def test_kernels_refuse_cpu_tensors_unless_interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        layer_ops.silu_mul(torch.zeros(2, 32))
    with pytest.raises(ValueError, match="cannot run here"):
        PagedAttention("triton", torch.device("cpu"), num_heads=4, num_kv_heads=2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.interpreting()
    assert PagedAttention("triton", torch.device("cpu"), num_heads=4, num_kv_heads=2).graph_safe
