"""The decoder layer's element-wise ops as Triton kernels, one launch each (models/ops.py's
`TritonOps`; the meaning is TorchOps'): residual add + RMSNorm, rotary + KV store, SiLU * up.

Unfused, these are the 30-odd small kernels per layer that made the GPU step launch-bound
(786 launches per 1B-shape step). Each rounds where transformers' torch code rounds: in bf16
a product or sum is rounded to bf16 before the next op uses it, so results are those of the
torch ops up to the order of a reduction (RMSNorm's sum of squares). Arithmetic is written on
float32 values and each downcast is explicit. (Triton's interpreter truncates float32 -> bf16
where the GPU rounds to nearest even, so on CPU the tests allow bf16 results one unit in the
last place off.)
"""

from __future__ import annotations

import torch

from services.worker.kernels import check_device, jit, next_power_of_2, triton

tl = triton().language


def _add_rms_norm(
    x_ptr,
    delta_ptr,
    weight_ptr,
    out_ptr,
    width,
    x_stride,
    delta_stride,
    out_stride,
    eps,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < width
    x = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * delta_stride + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * x_stride + cols, x, mask=ok)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / width
    normed = (xf * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0)
    out = weight.to(tl.float32) * normed.to(tl.float32)
    out = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_stride + cols, out, mask=ok)


def _rope_store(
    qkv_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    key_ptr,
    value_ptr,
    slot_blocks_ptr,
    slot_offsets_ptr,
    qkv_stride_row,
    rotary_stride,
    kv_stride_block,
    kv_stride_pos,
    kv_stride_head,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF_PADDED: tl.constexpr,
):
    """One program per (row, head of q, k or v): q rotated in place, k rotated into the key
    cache, v copied into the value cache."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = HEAD_DIM // 2
    cols = tl.arange(0, HALF_PADDED)
    ok = cols < half
    src = qkv_ptr + row * qkv_stride_row + head * HEAD_DIM
    first = tl.load(src + cols, mask=ok, other=0.0)
    second = tl.load(src + half + cols, mask=ok, other=0.0)
    dtype = qkv_ptr.dtype.element_ty
    if head < NUM_HEADS + NUM_KV_HEADS:
        position = tl.load(positions_ptr + row).to(tl.int64)
        table = position * rotary_stride + cols
        cos1 = tl.load(cos_ptr + table, mask=ok, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + table + half, mask=ok, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + table, mask=ok, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + half, mask=ok, other=0.0).to(tl.float32)
        x1 = first.to(tl.float32)
        x2 = second.to(tl.float32)
        # x * cos + rotate_half(x) * sin, each product rounded to the dtype as torch rounds it
        a1 = (x1 * cos1).to(dtype).to(tl.float32)
        b1 = (-x2 * sin1).to(dtype).to(tl.float32)
        a2 = (x2 * cos2).to(dtype).to(tl.float32)
        b2 = (x1 * sin2).to(dtype).to(tl.float32)
        first = (a1 + b1).to(dtype)
        second = (a2 + b2).to(dtype)
    if head < NUM_HEADS:
        tl.store(src + cols, first, mask=ok)
        tl.store(src + half + cols, second, mask=ok)
    else:
        block = tl.load(slot_blocks_ptr + row).to(tl.int64)
        offset = tl.load(slot_offsets_ptr + row).to(tl.int64)
        if head < NUM_HEADS + NUM_KV_HEADS:
            dst = key_ptr + (head - NUM_HEADS) * kv_stride_head
        else:
            dst = value_ptr + (head - NUM_HEADS - NUM_KV_HEADS) * kv_stride_head
        dst = dst + block * kv_stride_block + offset * kv_stride_pos
        tl.store(dst + cols, first, mask=ok)
        tl.store(dst + half + cols, second, mask=ok)


def _silu_mul(gate_up_ptr, out_ptr, width, in_stride, out_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    gate = tl.load(gate_up_ptr + row * in_stride + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * in_stride + width + cols, mask=ok, other=0.0)
    dtype = out_ptr.dtype.element_ty
    activated = (gate / (1.0 + tl.exp(-gate))).to(dtype)
    out = activated.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, out.to(dtype), mask=ok)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """x += delta (in place, when given); returns RMSNorm(x) * weight, both [T, width]."""
    check_device(x)
    rows, width = x.shape
    out = torch.empty_like(x)
    if rows == 0:
        return out
    _dense_rows(x, "x")
    if delta is not None:
        _dense_rows(delta, "delta")
    jit(_add_rms_norm)[(rows,)](
        x,
        x if delta is None else delta,
        weight,
        out,
        width,
        x.stride(0),
        0 if delta is None else delta.stride(0),
        out.stride(0),
        eps,
        HAS_DELTA=delta is not None,
        BLOCK=next_power_of_2(width),
    )
    return out


def rope_store(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor],
    slots: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """qkv [T, heads + 2 * kv_heads, head_dim], dense; returns the rotated query view."""
    check_device(qkv)
    key_cache, value_cache = kv
    rows, total_heads, head_dim = qkv.shape
    if not qkv.is_contiguous() or key_cache.stride() != value_cache.stride():
        raise ValueError("rope_store needs a dense qkv and caches of one layout")
    if key_cache.stride(-1) != 1 or total_heads != num_heads + 2 * num_kv_heads:
        raise ValueError("rope_store: caches with a dense head dim, qkv with q, k and v heads")
    if head_dim % 2 or cos.stride(0) != sin.stride(0):
        raise ValueError("rope_store: an even head dim and one rotary table layout")
    if rows:
        jit(_rope_store)[(rows, total_heads)](
            qkv,
            positions,
            cos,
            sin,
            key_cache,
            value_cache,
            slots[0],
            slots[1],
            qkv.stride(0),
            cos.stride(0),
            key_cache.stride(0),
            key_cache.stride(1),
            key_cache.stride(2),
            NUM_HEADS=num_heads,
            NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim,
            HALF_PADDED=next_power_of_2(head_dim // 2),
        )
    return qkv[:, :num_heads]


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of gate_up [T, 2 * width] (gate first); returns [T, width]."""
    check_device(gate_up)
    _dense_rows(gate_up, "gate_up")
    rows, double = gate_up.shape
    width = double // 2
    out = torch.empty((rows, width), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(1024, next_power_of_2(width))
        jit(_silu_mul)[(rows, -(-width // block))](
            gate_up, out, width, gate_up.stride(0), out.stride(0), BLOCK=block
        )
    return out


def _dense_rows(tensor: torch.Tensor, name: str) -> None:
    if tensor.dim() != 2 or tensor.stride(1) != 1:
        raise ValueError(f"{name}: rows [T, width] with a dense width")
