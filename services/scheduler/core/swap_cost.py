"""Swap or recompute: what to do with a job's KV when its device blocks are needed.

Swapping costs moving its blocks out and back (bytes / bandwidth, twice, plus a fixed latency);
recomputing costs a prefill of every token it has computed. Short contexts are cheaper to
recompute; long ones to swap. The bandwidth estimate starts from a default and follows the
swaps the worker reports (an exponential moving average).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.scheduler.core.profile import PerformanceProfile


@dataclass(slots=True)
class SwapCostModel:
    profile: PerformanceProfile
    block_bytes: int  # one block on one stage (all layers, K and V)
    bytes_per_s: float = 1e9  # swap bandwidth, one direction
    latency_s: float = 0.002  # fixed cost of one swap (RPCs, bookkeeping)
    smoothing: float = 0.2
    scale: float = 1.0  # multiplies swap costs: 0 always swaps, a large value always recomputes

    def swap_cost(self, num_blocks: int) -> float:
        """Out and back in."""
        return 2 * self.scale * (self.latency_s + num_blocks * self.block_bytes / self.bytes_per_s)

    def recompute_cost(self, num_tokens: int) -> float:
        return self.profile.prefill_time(num_tokens) if num_tokens else 0.0

    def prefer_swap(self, num_blocks: int, num_computed_tokens: int) -> bool:
        return self.swap_cost(num_blocks) < self.recompute_cost(num_computed_tokens)

    def observe(self, num_bytes: int, duration_s: float) -> None:
        """Folds a finished swap into the bandwidth estimate."""
        if num_bytes <= 0 or duration_s <= 0:
            return
        measured = num_bytes / max(duration_s - self.latency_s, duration_s / 2)
        self.bytes_per_s += self.smoothing * (measured - self.bytes_per_s)
