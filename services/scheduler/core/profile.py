"""The engine's measured speed: prefill time against prompt length, decode time against batch
size. Measured at start-up on the real worker (services/scheduler/profiler.py) and used by the
policies: skip-join placement, per-job charging, and default quanta."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass


def _interpolate(points: tuple[tuple[int, float], ...], x: float) -> float:
    """Piecewise-linear through `points` (sorted by x), extended linearly past both ends."""
    xs = [p[0] for p in points]
    if len(points) == 1:
        return points[0][1] * x / max(points[0][0], 1)
    i = min(max(bisect.bisect_left(xs, x), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True, slots=True)
class PerformanceProfile:
    prefill_s: tuple[tuple[int, float], ...]  # (prompt tokens, seconds of a lone prefill)
    decode_s: tuple[tuple[int, float], ...]  # (batch size, seconds of one decode iteration)

    def __post_init__(self) -> None:
        for name, points in (("prefill_s", self.prefill_s), ("decode_s", self.decode_s)):
            if not points or any(b[0] <= a[0] for a, b in itertools.pairwise(points)):
                raise ValueError(f"{name} needs points sorted by strictly increasing size")

    def prefill_time(self, num_tokens: int) -> float:
        return _interpolate(self.prefill_s, num_tokens)

    def decode_time(self, batch_size: int) -> float:
        return _interpolate(self.decode_s, max(batch_size, 1))

    def chunk_cost(self, num_tokens: int, batch_size: int) -> float:
        """Estimated standalone cost of one job's chunk in a batch of `batch_size` jobs: a
        decode shares its iteration with the batch; a prefill chunk costs its own prefill."""
        if num_tokens == 1:
            return self.decode_time(batch_size) / batch_size
        return self.prefill_time(num_tokens)

    def to_dict(self) -> dict[str, list[list[float]]]:
        return {
            "prefill_s": [list(p) for p in self.prefill_s],
            "decode_s": [list(p) for p in self.decode_s],
        }

    @classmethod
    def from_dict(cls, data: dict[str, list[list[float]]]) -> PerformanceProfile:
        return cls(
            prefill_s=tuple((int(n), float(t)) for n, t in data["prefill_s"]),
            decode_s=tuple((int(n), float(t)) for n, t in data["decode_s"]),
        )


# A stand-in for tests and the simulator: 10 ms decode, +1 ms per 16 prompt tokens.
SYNTHETIC_PROFILE = PerformanceProfile(
    prefill_s=((1, 0.010), (2048, 0.010 + 2048 / 16 * 0.001)),
    decode_s=((1, 0.010), (64, 0.020)),
)
