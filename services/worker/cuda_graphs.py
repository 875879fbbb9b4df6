"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model on a GPU is bound by the CPU issuing its kernels (hundreds per
step), not by the GPU. A CUDA graph records the step's launches once and replays them with one
call. As vLLM does, graphs are captured at start-up for a list of batch sizes (1, 2, 4, 8, then
every 8 up to the largest); a decode step of n jobs runs the smallest bucket >= n, its inputs
padded. Steps with prompt chunks, or longer than the block table a graph was captured with,
run eagerly (piecewise graphs for them are not done).

What a graph reads lives in static tensors that each step overwrites before replaying:
- the step's index buffer (ModelRunner.prepare writes it with one host-to-device copy: tokens,
  positions, KV slots, query starts, context lengths, block tables of a fixed width);
- the hidden states in, for a pipeline stage after the first.
Padding rows are one-token jobs at position 0 whose block table and KV slot are the pool's
scratch block, which no job owns: they compute garbage there and nothing reads it.

Without CUDA (the tests), `capture=False` runs the same padded, static-buffer step eagerly, so
the padding and the buffers are checked on CPU; only the recording itself needs a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from services.worker.batch import SeqChunk


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to and including `max_batch`."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, max_batch, 8))
    return sorted({*sizes, max_batch})


@dataclass(slots=True)
class _Bucket:
    size: int
    buffer: torch.Tensor  # the step's int32 index buffer (ModelRunner.prepare's layout)
    hidden_in: torch.Tensor | None  # a later stage's input activations
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    out: torch.Tensor | None = None  # what the captured step returns (logits or hidden)


class DecodeGraphs:
    """Decode steps of up to `max_batch` jobs, each with at most `width` blocks of context."""

    def __init__(
        self,
        *,
        max_batch: int,
        width: int,
        buffer_size: Callable[[int], int],
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        needs_hidden_in: bool,
        capture: bool,
    ) -> None:
        if max_batch < 1 or width < 1:
            raise ValueError(
                f"decode graphs need max_batch and width >= 1, not {max_batch}, {width}"
            )
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.width = width
        self.capture_enabled = capture
        self.sizes = bucket_sizes(max_batch)
        self.buckets = {
            size: _Bucket(
                size=size,
                buffer=torch.zeros(buffer_size(size), dtype=torch.int32, device=device),
                hidden_in=(
                    torch.zeros((size, hidden_size), dtype=dtype, device=device)
                    if needs_hidden_in
                    else None
                ),
            )
            for size in self.sizes
        }
        self.num_replays = 0  # steps that ran through a bucket (replayed or, on CPU, padded)
        self.capture_s = 0.0
        self._pool: Any = None

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def bucket_for(self, seqs: list[SeqChunk], block_size: int) -> int | None:
        """The bucket a step runs in, or None if it runs eagerly: only decodes that all sample,
        at most max_batch of them, each within `width` blocks."""
        if not seqs or len(seqs) > self.max_batch:
            return None
        for seq in seqs:
            if seq.num_tokens != 1 or not seq.sample:
                return None
            if -(-seq.end_pos // block_size) > self.width:
                return None
        return next(size for size in self.sizes if size >= len(seqs))

    def capture(self, inputs_for: Callable[[int], Any], forward: Callable[[Any, Any], Any]) -> None:
        """Records `forward(inputs, hidden_in)` for every bucket, largest first (they share one
        memory pool), after warm-up runs that compile kernels and pick matmul algorithms.
        `inputs_for(size)` writes a padding-only step into the bucket's buffer. Without
        capture (CPU), nothing to do: each step runs eagerly on its bucket's buffers."""
        if not self.capture_enabled:
            return
        started = time.perf_counter()
        for size in reversed(self.sizes):
            bucket = self.buckets[size]
            inputs = inputs_for(size)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    forward(inputs, bucket.hidden_in)
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                bucket.out = forward(inputs, bucket.hidden_in)
            bucket.graph = graph
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - started

    def run(
        self,
        size: int,
        inputs: Any,
        hidden_in: torch.Tensor | None,
        forward: Callable[[Any, Any], Any],
    ) -> torch.Tensor:
        """The step whose inputs ModelRunner.prepare wrote into bucket `size`'s buffer: replays
        its graph (or runs it eagerly on the static buffers when not capturing). Returns the
        output for every padded row."""
        bucket = self.buckets[size]
        if hidden_in is not None:
            if bucket.hidden_in is None:
                raise ValueError("this stage embeds its own tokens: no hidden states in")
            # the padding rows keep whatever earlier steps left: finite, and nothing reads
            # what they compute
            bucket.hidden_in[: hidden_in.shape[0]].copy_(hidden_in)
        self.num_replays += 1
        if bucket.graph is None:
            return forward(inputs, bucket.hidden_in)
        bucket.graph.replay()
        assert bucket.out is not None
        return bucket.out
