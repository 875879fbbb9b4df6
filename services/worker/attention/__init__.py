"""Attention over the paged KV pool: one call per layer for the whole step.

Backends, by name (`--attention-backend`):
- `cpu-kernel`: paged_attention.cpp, reads the pool in place (CPU; the default there);
- `reference`: gather each job's context, then SDPA per job (any device; the tests' yardstick).
`auto` picks the kernel on CPU and the reference elsewhere until a GPU backend lands.
"""

from __future__ import annotations

from typing import Any

import torch

from services.worker.attention import cpu_kernel
from services.worker.attention.metadata import AttentionMetadata
from services.worker.attention.reference import reference_attention

BACKENDS = ("auto", "cpu-kernel", "reference")

__all__ = ["BACKENDS", "AttentionMetadata", "PagedAttention"]


class PagedAttention:
    """The chosen backend, planned once per step (`plan`) and run per layer (`__call__`)."""

    def __init__(self, backend: str, device: torch.device) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self._kernel = None
        if backend in ("auto", "cpu-kernel") and device.type == "cpu":
            self._kernel = cpu_kernel.load()
            if self._kernel is None and backend == "cpu-kernel":
                raise ValueError("the cpu-kernel attention backend could not be built")
        elif backend == "cpu-kernel":
            raise ValueError(f"the cpu-kernel attention backend needs a CPU device, not {device}")
        self.name = "cpu-kernel" if self._kernel is not None else "reference"
        self._plan: Any = None
        self._meta: AttentionMetadata | None = None

    def plan(self, meta: AttentionMetadata) -> None:
        self._meta = meta
        self._plan = self._kernel.plan(meta) if self._kernel is not None else None

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
        return reference_attention(
            query, key_cache, value_cache, self._meta, scale=scale, window=window
        )
