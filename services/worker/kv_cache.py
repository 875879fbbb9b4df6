"""The physical paged KV cache: a fixed pool of blocks, each holding `block_size` positions.

Layout is block-major: one tensor [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads,
head_dim]. Everything one block holds, over all layers, is then one contiguous slice, so swapping
a block to host memory (FastServe's proactive swapping) is a single copy per block rather than
one per layer. The attention code sees per-layer views [num_blocks, block_size, heads, head_dim]
and addresses a token by (block id, offset in block).

The model writes and reads it through per-layer views (`keys`, `values`); attention reads the
blocks in place. The pool knows nothing of jobs: which block belongs to whom is the block
manager's business; this module only holds the blocks and copies them out and in for swapping.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

K_INDEX, V_INDEX = 0, 1


class KVCache:
    """A pool of KV blocks for `num_layers` consecutive layers (one pipeline stage's worth)."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        spare_blocks: int = 0,
    ) -> None:
        """`spare_blocks` more blocks follow the `num_blocks` that jobs use, for the runner's
        own scratch (`scratch_block`: where padding rows of a graph step write)."""
        if num_blocks <= 0 or block_size <= 0 or num_layers <= 0:
            raise ValueError(
                f"num_blocks, block_size and num_layers must be positive, got "
                f"{num_blocks}, {block_size}, {num_layers}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scratch_block = num_blocks if spare_blocks > 0 else -1
        self.data = torch.zeros(
            (num_blocks + spare_blocks, num_layers, 2, block_size, num_kv_heads, head_dim),
            dtype=dtype,
            device=device,
        )

    @staticmethod
    def bytes_per_block(
        *, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    @property
    def block_bytes(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def keys(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s keys as a view [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.data[:, layer, K_INDEX]

    def values(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s values as a view [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.data[:, layer, V_INDEX]

    def read_blocks(
        self, block_ids: Sequence[int], device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """A copy of the given blocks, [len(block_ids), num_layers, 2, block_size, heads, head_dim].

        For swapping out: the result does not alias the pool, so the blocks may be reused.
        """
        index = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
        return self.data.index_select(0, index).to(device)

    def write_blocks(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        """Stores a read_blocks() result (from any device) into the given blocks, in order."""
        expected = (len(block_ids), *self.data.shape[1:])
        if tuple(blocks.shape) != expected:
            raise ValueError(f"blocks have shape {tuple(blocks.shape)}, expected {expected}")
        index = torch.as_tensor(list(block_ids), dtype=torch.long, device=self.device)
        self.data.index_copy_(0, index, blocks.to(device=self.device, dtype=self.dtype))

    def block_views(self, block_ids: Sequence[int]) -> list[memoryview]:
        """The given blocks as byte views of the pool itself, in order (CPU pools only); a run
        of consecutive block ids comes as one view. Swapping reads and writes these directly
        (one pwritev / preadv against the kvstore's shared memory), with no staging copy."""
        if self.data.device.type != "cpu":
            raise ValueError("block_views needs a CPU pool")
        runs: list[list[int]] = []  # [first, last] of each run of consecutive ids
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks:
                raise ValueError(f"block {block_id} out of [0, {self.num_blocks})")
            if runs and block_id == runs[-1][1] + 1:
                runs[-1][1] = block_id
            else:
                runs.append([block_id, block_id])
        flat = self.data.view(self.data.shape[0], -1).view(torch.uint8)
        return [memoryview(flat[first : last + 1].numpy()).cast("B") for first, last in runs]

    def clear(self) -> None:
        """Zeroes every block. Not needed for correctness (positions are always written before
        they are read), but keeps stale data from leaking into debugging sessions."""
        self.data.zero_()
