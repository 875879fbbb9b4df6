"""What attention needs to know about a step, built once per step and shared by every layer.

The layout is the one GPU varlen kernels take (flash-attn's `flash_attn_varlen_func` with a block
table, FlashInfer's paged prefill), so every backend reads the same tensors:
- the step's new tokens are rows, job after job (decodes one row, prompt chunks many);
- `query_start[s] .. query_start[s + 1]` are job s's rows;
- `seq_lens[s]` is job s's context once this step has run: its rows are positions
  `seq_lens[s] - num_rows .. seq_lens[s] - 1` and see keys at positions `<=` their own;
- `block_tables[s, i]` holds job s's positions `[i * block_size, (i + 1) * block_size)`;
- `slot_blocks[t], slot_offsets[t]` is where row t's key and value are written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    query_start: torch.Tensor  # [num_seqs + 1] int32, cumulative rows
    seq_lens: torch.Tensor  # [num_seqs] int32, context after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with block 0
    slot_blocks: torch.Tensor  # [T] int64, block each row's K/V is written to
    slot_offsets: torch.Tensor  # [T] int64, offset inside that block
    # Host copies of the per-job lengths, for backends that plan on the CPU (the reference).
    query_lens_host: tuple[int, ...]
    seq_lens_host: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_rows(self) -> int:
        return int(sum(self.query_lens_host))

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_host, default=0)
