"""Paged attention for a whole step in one Triton kernel: prompt chunks and decodes together,
reading K and V where they lie in the block pool (the layout of attention/metadata.py).

One program per (block of up to BLOCK_Q query rows of one job, KV head). The rows of the query
heads that share that KV head are packed together (GQA), so each key tile is read once for the
whole group and both products are tensor-core matmuls of at least 16 rows. Keys are visited in
tiles of TILE positions with an online softmax, from the first position any row of the block
can see (sliding window) to the last (causal). Job s's programs start at
`query_start[s] // BLOCK_Q + s`, so a program finds its job by a binary search over
`query_start` and the grid, `num_rows // BLOCK_Q + num_seqs` programs, depends on sizes only:
a decode step of a given batch size launches the same grid every time (CUDA graphs).

The scheme is the one of vLLM's Triton "unified attention" kernel; this is our own, smaller
version (no ALiBi, sinks, soft-capping or FP8).
"""

from __future__ import annotations

import torch

from services.worker.attention.metadata import AttentionMetadata
from services.worker.kernels import check_device, jit, next_power_of_2, triton

tl = triton().language

MIN_DOT = 16  # tl.dot needs at least 16 rows, columns and inner dimension


def _paged_attention(
    out_ptr,
    query_ptr,
    key_ptr,
    value_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    num_seqs,
    scale,
    q_stride_row,
    q_stride_head,
    out_stride_row,
    out_stride_head,
    kv_stride_block,
    kv_stride_pos,
    kv_stride_head,
    table_stride,
    QUERIES_PER_KV: tl.constexpr,
    GROUP: tl.constexpr,  # QUERIES_PER_KV rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE: tl.constexpr,
    WINDOW: tl.constexpr,  # 0: full attention
    PRECISION: tl.constexpr,  # "ieee" for float32 inputs (not TF32), else None
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)

    # The job this program serves: the last s with query_start[s] // BLOCK_Q + s <= q_block.
    low = 0
    high = num_seqs
    while low < high:
        mid = (low + high) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= q_block:
            low = mid + 1
        else:
            high = mid
    seq = low - 1

    row_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - row_start
    local = q_block - (row_start // BLOCK_Q + seq)
    if local * BLOCK_Q < query_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        context = seq_len - query_len  # positions written before this step

        offs_m = tl.arange(0, BLOCK_Q * GROUP)
        q_row = local * BLOCK_Q + offs_m // GROUP  # row within the job's chunk
        in_group = offs_m % GROUP
        head = kv_head * QUERIES_PER_KV + in_group
        row_ok = (q_row < query_len) & (in_group < QUERIES_PER_KV)
        offs_d = tl.arange(0, HEAD_DIM_PADDED)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(
            query_ptr
            + (row_start + q_row)[:, None] * q_stride_row
            + head[:, None] * q_stride_head
            + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        q_pos = context + q_row  # each row's position; it sees keys at positions <= its own

        key_end = tl.minimum(seq_len, context + (local + 1) * BLOCK_Q)
        key_begin = 0
        if WINDOW > 0:
            key_begin = tl.maximum(0, context + local * BLOCK_Q - WINDOW + 1)

        m_i = tl.full([BLOCK_Q * GROUP], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q * GROUP], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP, HEAD_DIM_PADDED], dtype=tl.float32)
        offs_t = tl.arange(0, TILE)
        for tile in range(key_begin // TILE, tl.cdiv(key_end, TILE)):
            k_pos = tile * TILE + offs_t
            k_ok = k_pos < key_end
            block = tl.load(
                block_tables_ptr + seq * table_stride + k_pos // BLOCK_SIZE, mask=k_ok, other=0
            ).to(tl.int64)
            kv_offset = (
                block * kv_stride_block + (k_pos % BLOCK_SIZE) * kv_stride_pos
            ) + kv_head * kv_stride_head
            k = tl.load(
                key_ptr + kv_offset[None, :] + offs_d[:, None],
                mask=k_ok[None, :] & d_ok[:, None],
                other=0.0,
            )  # [HEAD_DIM_PADDED, TILE]
            v = tl.load(
                value_ptr + kv_offset[:, None] + offs_d[None, :],
                mask=k_ok[:, None] & d_ok[None, :],
                other=0.0,
            )  # [TILE, HEAD_DIM_PADDED]
            scores = tl.dot(q, k, input_precision=PRECISION) * scale
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
            if WINDOW > 0:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - WINDOW)
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr
            + (row_start + q_row)[:, None] * out_stride_row
            + head[:, None] * out_stride_head
            + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


class Launch:
    """The launch shape of one step (from host-known sizes only), chosen by `plan`."""

    __slots__ = ("block_q", "grid_rows", "meta", "tile")

    def __init__(self, meta: AttentionMetadata, block_q: int, tile: int) -> None:
        self.meta = meta
        self.block_q = block_q
        self.tile = tile
        self.grid_rows = meta.num_rows // block_q + meta.num_seqs


def plan(meta: AttentionMetadata, *, num_heads: int, num_kv_heads: int, tile: int = 32) -> Launch:
    """Decode-only steps put one job per program (its query heads make up the 16 rows a
    matmul needs); steps with prompt chunks take blocks of about 64 query rows."""
    group = next_power_of_2(num_heads // num_kv_heads)
    target = MIN_DOT if meta.max_query_len <= 1 else 64
    block_q = max(1, target // group)
    return Launch(meta, block_q, tile)


def paged_attention(
    launch: Launch,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """query [T, heads, head_dim] (rows may be strided, the head dim dense); caches
    [num_blocks, block_size, kv_heads, head_dim] views of the pool. Returns [T, heads, head_dim]."""
    meta = launch.meta
    rows, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1:
        raise ValueError("paged_attention: K and V caches of one layout, head dim dense")
    if query.stride(-1) != 1:
        raise ValueError("paged_attention: the query's head dim must be dense")
    queries_per_kv = num_heads // num_kv_heads
    group = next_power_of_2(queries_per_kv)
    out = torch.empty((rows, num_heads, head_dim), dtype=query.dtype, device=query.device)
    check_device(query)
    kernel = jit(_paged_attention)
    kernel[(launch.grid_rows, num_kv_heads)](
        out,
        query,
        key_cache,
        value_cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start,
        meta.num_seqs,
        scale,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        meta.block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=max(MIN_DOT, next_power_of_2(head_dim)),
        BLOCK_SIZE=key_cache.shape[1],
        BLOCK_Q=launch.block_q,
        TILE=launch.tile,
        WINDOW=window or 0,
        PRECISION="ieee" if query.dtype == torch.float32 else None,
    )
    return out
