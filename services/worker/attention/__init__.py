"""Attention over the paged KV pool: one call per layer for the whole step.

Backends, by name (`--attention-backend`):
- `cpu-kernel`: paged_attention.cpp, reads the pool in place (CPU; the default there);
- `triton`: kernels/paged_attention.py, reads the pool in place, one launch per layer whatever
  the step's mix, a fixed grid for a decode batch size (CUDA; the default there, and the one CUDA
  graphs need). On CPU it runs only under Triton's interpreter, for the tests;
- `reference`: gather each job's context, then SDPA per job (any device; the tests' yardstick).
`auto` picks the CPU kernel on CPU, Triton on CUDA (the reference where Triton is missing).
"""

from __future__ import annotations

from typing import Any

import torch

from services.worker.attention import cpu_kernel
from services.worker.attention.metadata import AttentionMetadata
from services.worker.attention.reference import reference_attention

BACKENDS = ("auto", "cpu-kernel", "triton", "reference")

__all__ = ["BACKENDS", "AttentionMetadata", "PagedAttention"]


class PagedAttention:
    """The chosen backend, planned once per step (`plan`) and run per layer (`__call__`)."""

    def __init__(
        self, backend: str, device: torch.device, *, num_heads: int, num_kv_heads: int
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self._kernel = None
        self._triton: Any = None
        self._heads = (num_heads, num_kv_heads)
        if backend in ("auto", "cpu-kernel") and device.type == "cpu":
            self._kernel = cpu_kernel.load()
            if self._kernel is None and backend == "cpu-kernel":
                raise ValueError("the cpu-kernel attention backend could not be built")
        elif backend == "cpu-kernel":
            raise ValueError(f"the cpu-kernel attention backend needs a CPU device, not {device}")
        elif backend == "triton" or (backend == "auto" and device.type == "cuda"):
            self._triton = _load_triton(device, required=backend == "triton")
        self.name = (
            "cpu-kernel" if self._kernel is not None else "triton" if self._triton else "reference"
        )
        self._plan: Any = None
        self._meta: AttentionMetadata | None = None

    @property
    def graph_safe(self) -> bool:
        """Whether a step can be captured in a CUDA graph: no host work per layer, a launch
        shape that depends on sizes only (the Triton kernel; the reference builds index tensors
        from host lists)."""
        return self._triton is not None

    def plan(self, meta: AttentionMetadata) -> None:
        self._meta = meta
        if self._kernel is not None:
            self._plan = self._kernel.plan(meta)
        elif self._triton is not None:
            num_heads, num_kv_heads = self._heads
            self._plan = self._triton.plan(meta, num_heads=num_heads, num_kv_heads=num_kv_heads)

    def __call__(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        *,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """query [T, heads, head_dim] -> [T, heads, head_dim], for the step last planned."""
        if self._meta is None:
            raise RuntimeError("PagedAttention: plan(meta) before calling it")
        if self._kernel is not None:
            return self._kernel(
                self._plan, query, key_cache, value_cache, scale=scale, window=window
            )
        if self._triton is not None:
            return self._triton.paged_attention(
                self._plan, query, key_cache, value_cache, scale=scale, window=window
            )
        return reference_attention(
            query, key_cache, value_cache, self._meta, scale=scale, window=window
        )


def _load_triton(device: torch.device, *, required: bool) -> Any:
    """kernels.paged_attention, or None where it cannot run (only an error when `required`)."""
    from services.worker import kernels

    why = ""
    if not kernels.available():
        why = "Triton is not installed"
    elif device.type != "cuda" and not kernels.interpreting():
        why = f"it runs on CUDA (on {device} only under TRITON_INTERPRET=1, for tests)"
    if why:
        if required:
            raise ValueError(f"the triton attention backend cannot run here: {why}")
        return None
    from services.worker.kernels import paged_attention

    return paged_attention
