"""The plain attention path: each job's keys and values gathered out of the pool, then SDPA.

Slow (a copy of every context per layer, one call per job) but written with nothing but torch
ops that the oracle tests trust, so the fast backends are checked against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.worker.attention.metadata import AttentionMetadata


def reference_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """query [T, heads, head_dim]; caches [num_blocks, block_size, kv_heads, head_dim]."""
    block_size = key_cache.shape[1]
    out = torch.empty_like(query)
    row = 0
    for seq, (num_rows, seq_len) in enumerate(
        zip(meta.query_lens_host, meta.seq_lens_host, strict=True)
    ):
        num_blocks = -(-seq_len // block_size)
        table = meta.block_tables[seq, :num_blocks]
        keys = key_cache[table].flatten(0, 1)[:seq_len].transpose(0, 1)  # [kv_heads, S, D]
        values = value_cache[table].flatten(0, 1)[:seq_len].transpose(0, 1)
        key_pos = torch.arange(seq_len, device=query.device)[None, :]
        query_pos = torch.arange(seq_len - num_rows, seq_len, device=query.device)[:, None]
        mask = key_pos <= query_pos
        if window is not None:
            mask &= key_pos > query_pos - window
        rows = slice(row, row + num_rows)
        attended = F.scaled_dot_product_attention(
            query[rows].transpose(0, 1)[None],  # [1, heads, n, D]
            keys[None],
            values[None],
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = attended[0].transpose(0, 1)
        row += num_rows
    return out
