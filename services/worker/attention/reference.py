"""The plain attention path: keys and values gathered out of the pool, then SDPA.

Written with nothing but torch ops, so the tests trust it as the yardstick of the native kernel,
and it runs on any device (on a GPU until a paged kernel backend lands there). Decodes (one query
row each) share one padded SDPA call over their gathered block tables, with a mask hiding the
padding and anything outside the sliding window; prompt chunks run one call each. Gathering
copies each context once per layer: that is the cost the native kernel removes.
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
    device = query.device
    out = torch.empty_like(query)
    starts = [0]
    for num_rows in meta.query_lens_host:
        starts.append(starts[-1] + num_rows)
    decodes = [s for s, n in enumerate(meta.query_lens_host) if n == 1]
    if decodes:
        lens = [meta.seq_lens_host[s] for s in decodes]
        num_blocks = -(-max(lens) // block_size)
        index = torch.tensor(decodes, device=device)
        tables = meta.block_tables[index, :num_blocks]
        shape = (len(decodes), num_blocks * block_size, *key_cache.shape[2:])
        keys = key_cache[tables].reshape(shape).transpose(1, 2)  # [B, kv_heads, S, D]
        values = value_cache[tables].reshape(shape).transpose(1, 2)
        rows = torch.tensor([starts[s] for s in decodes], device=device)
        query_pos = torch.tensor(lens, device=device)[:, None] - 1
        mask = _visible(torch.arange(shape[1], device=device)[None], query_pos, window)
        attended = F.scaled_dot_product_attention(
            query[rows][:, :, None],  # [B, heads, 1, D]
            keys,
            values,
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = attended[:, :, 0]
    for seq, num_rows in enumerate(meta.query_lens_host):
        if num_rows == 1:
            continue
        seq_len = meta.seq_lens_host[seq]
        table = meta.block_tables[seq, : -(-seq_len // block_size)]
        keys = key_cache[table].flatten(0, 1)[:seq_len].transpose(0, 1)  # [kv_heads, S, D]
        values = value_cache[table].flatten(0, 1)[:seq_len].transpose(0, 1)
        query_pos = torch.arange(seq_len - num_rows, seq_len, device=device)[:, None]
        mask = _visible(torch.arange(seq_len, device=device)[None], query_pos, window)
        rows = slice(starts[seq], starts[seq + 1])
        attended = F.scaled_dot_product_attention(
            query[rows].transpose(0, 1)[None],  # [1, heads, n, D]
            keys[None],
            values[None],
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = attended[0].transpose(0, 1)
    return out


def _visible(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query sees: those at or before it, within the sliding window if any."""
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask
