"""FlexAttention (torch.compile, inductor's C++ CPU template) reading FastServe's KV pool in
place: the pool viewed as one run of positions, a block mask per step from the block tables, causal
order and the sliding window in a mask_mod. What bench/attention_flex_cpu.py times; how and why in
that script's docstring. Shapes are SmolLM2-135M's (below)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 30, 9, 3, 64, 16
LAYER = 7  # the layer the benchmark reads


def pool_views(pool: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """K_l, V_l as [1, H_kv, KV_LEN, D] views of the whole pool (no copy); page stride 2L."""
    num_blocks, num_layers = pool.shape[0], pool.shape[1]
    flat = pool.view(-1, NUM_KV_HEADS, HEAD_DIM)
    kv_len = (num_blocks - 1) * 2 * num_layers * BLOCK_SIZE + BLOCK_SIZE
    k0 = 2 * layer * BLOCK_SIZE
    v0 = k0 + BLOCK_SIZE
    k = flat[k0 : k0 + kv_len].permute(1, 0, 2).unsqueeze(0)
    v = flat[v0 : v0 + kv_len].permute(1, 0, 2).unsqueeze(0)
    assert (
        k.data_ptr() == pool[0, layer, 0].data_ptr()
        and v.data_ptr() == pool[0, layer, 1].data_ptr()
    )
    return k, v, kv_len


@dataclass
class StepMask:
    """Everything flex needs for a step, built once and shared by all layers."""

    kv_num: torch.Tensor  # [S, 1, nQB] int32, partial (masked) tiles
    kv_idx: torch.Tensor  # [S, 1, nQB, NPAGES] int32 (overlapping view)
    full_num: torch.Tensor
    full_idx: torch.Tensor
    q_start: torch.Tensor  # [S] int64: position of each seq's first query row
    blk_logical: torch.Tensor  # [S, num_blocks] int32: logical page of a physical block
    q_block: int
    q_pad: int  # padded query rows per seq
    seq_ids: list[int]  # which seqs of the batch (rows of the step) this covers

    def kernel_args(self) -> tuple[torch.Tensor, ...]:
        """The mask's tensors in the order the compiled function takes them."""
        return (
            self.kv_num,
            self.kv_idx,
            self.full_num,
            self.full_idx,
            self.q_start,
            self.blk_logical,
        )


def _wide(x: torch.Tensor, npages: int) -> torch.Tensor:
    """[S, 1, nQB, J] -> an overlapping [S, 1, nQB, npages] view of the same data (+ padding)."""
    S, _, nqb, J = x.shape
    store = torch.zeros(S * nqb * J + npages, dtype=torch.int32)
    store[: S * nqb * J] = x.reshape(-1)
    return store.as_strided((S, 1, nqb, npages), (nqb * J, nqb * J, J, 1))


def build_step_mask(
    b_tables, seq_lens, q_lens, seq_ids, q_block, window, num_blocks, num_layers
) -> StepMask:
    page_stride = 2 * num_layers
    npages = (num_blocks - 1) * page_stride + 1
    ids = torch.tensor(seq_ids)
    tbl = b_tables[ids].long()  # [S, J]
    slen = seq_lens[ids].long()
    qlen = torch.tensor([q_lens[i] for i in seq_ids])
    S, J = tbl.shape
    q_pad = ((int(qlen.max()) + q_block - 1) // q_block) * q_block
    nqb = q_pad // q_block
    q_start = slen - qlen
    k = torch.arange(nqb)
    qlo = q_start[:, None] + k[None, :] * q_block  # [S, nQB]
    qhi = torch.minimum(qlo + q_block, slen[:, None]) - 1
    valid = (k[None, :] * q_block) < qlen[:, None]
    j = torch.arange(J)[None, None, :]
    vis = valid[..., None] & (j <= (qhi // BLOCK_SIZE)[..., None])
    full = vis & ((j + 1) * BLOCK_SIZE - 1 <= qlo[..., None])
    if window is not None:
        vis &= (j + 1) * BLOCK_SIZE - 1 > (qlo - window)[..., None]
        full &= j * BLOCK_SIZE > (qhi - window)[..., None]
    part = vis & ~full
    phys = (tbl * page_stride).to(torch.int32)[:, None, :].expand(S, nqb, J)

    def compact(sel):
        order = torch.sort(sel.to(torch.int8), dim=-1, descending=True, stable=True).indices
        idx = torch.gather(phys, -1, order)
        return sel.sum(-1).to(torch.int32)[:, None], _wide(idx[:, None], npages)

    kv_num, kv_idx = compact(part)
    full_num, full_idx = compact(full)
    nblk = (slen + BLOCK_SIZE - 1) // BLOCK_SIZE
    blk_logical = torch.zeros(S, num_blocks, dtype=torch.int32)
    live = torch.arange(J)[None, :] < nblk[:, None]
    rows = torch.arange(S)[:, None].expand(S, J)[live]
    blk_logical[rows, tbl[live]] = torch.arange(J)[None, :].expand(S, J)[live].to(torch.int32)
    return StepMask(
        kv_num, kv_idx, full_num, full_idx, q_start, blk_logical, q_block, q_pad, seq_ids
    )


def make_flex_fn(
    num_layers: int, window: int | None, dynamic, partition_size: int | None, q_block: int
):
    page_span = 2 * num_layers * BLOCK_SIZE
    kernel_options = {} if partition_size is None else {"PARTITION_SIZE": partition_size}

    def attend(q, k, v, kv_num, kv_idx, full_num, full_idx, q_start, blk_logical, scale):
        def mask_mod(b, h, q_idx, kv_i):
            kv_pos = blk_logical[b, kv_i // page_span] * BLOCK_SIZE + kv_i % BLOCK_SIZE
            q_pos = q_start[b] + q_idx
            m = kv_pos <= q_pos
            if window is not None:
                m = m & (kv_pos > q_pos - window)
            return m

        bm = BlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=(q_block, BLOCK_SIZE),
            mask_mod=mask_mod,
            seq_lengths=(q.shape[2], k.shape[2]),
            compute_q_blocks=False,
        )
        return flex_attention(
            q, k, v, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=kernel_options
        )

    return torch.compile(attend, dynamic=dynamic, fullgraph=True)


class FlexPaged:
    """paged_attention() on flex: decodes in one call (q tile 1, the [T, H, D] query viewed as
    [S, H, 1, D], no copy); prefill chunks in another (q tile `prefill_q_block`, rows padded)."""

    def __init__(
        self, pool, *, window=None, dynamic=None, prefill_q_block=32, partition_size=24, split=True
    ):
        self.pool = pool
        self.window = window
        self.num_blocks, self.num_layers = pool.shape[0], pool.shape[1]
        self.fns = {
            qb: make_flex_fn(self.num_layers, window, dynamic, partition_size, qb)
            for qb in {1, prefill_q_block}
        }
        self.prefill_q_block = prefill_q_block
        self.split = split

    def prepare(self, block_tables, query_start, seq_lens) -> list[StepMask]:
        q_lens = (query_start[1:] - query_start[:-1]).tolist()
        dec = [i for i, q in enumerate(q_lens) if q == 1]
        pre = [i for i, q in enumerate(q_lens) if q != 1]
        args = (block_tables, seq_lens, q_lens)
        geo = (self.window, self.num_blocks, self.num_layers)
        if not self.split:
            qb = 1 if not pre else self.prefill_q_block
            return [build_step_mask(*args, list(range(len(q_lens))), qb, *geo)]
        masks = []
        if dec:
            masks.append(build_step_mask(*args, dec, 1, *geo))
        if pre:
            masks.append(build_step_mask(*args, pre, self.prefill_q_block, *geo))
        return masks

    def forward(self, query, layer, query_start, masks: list[StepMask], scale):
        k, v, _ = pool_views(self.pool, layer)
        out = torch.empty_like(query)
        qs = query_start.tolist()
        for m in masks:
            S = len(m.seq_ids)
            if m.q_pad == 1:  # decodes: the query rows as [S, H, 1, D], no padding
                if len(qs) - 1 == S:
                    q = query.unsqueeze(2)  # all rows are decodes: a view
                else:
                    rows = query_start[m.seq_ids].long()
                    q = query[rows].unsqueeze(2)
                o = self.fns[1](q, k, v, *m.kernel_args(), scale)
                if len(qs) - 1 == S:
                    return o.squeeze(2)
                out[rows] = o.squeeze(2)
                continue
            q = query.new_zeros(S, m.q_pad, NUM_HEADS, HEAD_DIM)
            for r, s in enumerate(m.seq_ids):
                q[r, : qs[s + 1] - qs[s]] = query[qs[s] : qs[s + 1]]
            o = self.fns[m.q_block](q.transpose(1, 2), k, v, *m.kernel_args(), scale)
            o = o.transpose(1, 2)  # [S, q_pad, H, D]
            for r, s in enumerate(m.seq_ids):
                out[qs[s] : qs[s + 1]] = o[r, : qs[s + 1] - qs[s]]
        return out

    def __call__(
        self,
        query,
        key_cache,
        value_cache,
        block_tables,
        query_start,
        seq_lens,
        scale,
        window,
        layer=None,
    ):
        assert window == self.window
        masks = self.prepare(block_tables, query_start, seq_lens)
        return self.forward(query, LAYER if layer is None else layer, query_start, masks, scale)
