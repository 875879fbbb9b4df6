"""SchedulerStats: the one record of what the scheduler has done and holds now. The engine
adds what only it sees (the workers' times, frontends); services/scheduler/stats_table.py says
how each figure is exported, for the Stats RPC and /metrics alike."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW = 1000  # iterations the means are taken over


@dataclass(slots=True)
class Counters:
    """Totals since start, counted where they happen (one instance per core)."""

    num_iterations: int = 0
    num_submitted_jobs: int = 0
    num_finished_jobs: int = 0  # stopped or reached their length
    num_cancelled_jobs: int = 0
    num_rejected_jobs: int = 0
    num_preemptions: int = 0  # running jobs that dropped out of the batch
    num_recomputed_jobs: int = 0  # preemptions that dropped the KV
    num_swapped_out_jobs: int = 0  # swap-outs started
    num_swapped_in_jobs: int = 0  # swap-ins completed
    num_swap_failures: int = 0  # swaps the kvstore refused or lost (jobs recomputed)
    num_prefix_query_tokens: int = 0  # tokens of jobs that looked up the prefix cache
    num_prefix_hit_tokens: int = 0  # ... of them found cached on the device
    num_prefix_host_hit_tokens: int = 0  # ... found in the kvstore and read back


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    counters: Counters = field(default_factory=Counters)  # a copy, taken with the rest
    num_waiting_jobs: int = 0  # admitted, not in the last batch
    num_running_jobs: int = 0  # in flight or in the last batch
    num_preempted_jobs: int = 0  # ran before, not running now
    num_total_blocks: int = 0
    num_free_blocks: int = 0  # never used, or cached with no reference
    num_cached_blocks: int = 0  # named in the prefix cache (in use or not)
    num_host_cached_blocks: int = 0  # cached blocks kept in the kvstore (or on their way)
    num_swaps_in_flight: int = 0
    num_host_jobs: int = 0  # jobs whose KV is in the kvstore now
    swap_bytes_per_s: float = 0.0  # current bandwidth estimate
    # Waiting jobs per policy queue level, level 0 first: one entry per level, so an empty
    # level reads 0 rather than disappearing.
    num_jobs_per_level: tuple[int, ...] = ()
    # (priority class, waiting jobs, running jobs) for every class up to the largest seen.
    num_jobs_per_class: tuple[tuple[int, int, int], ...] = ()
    mean_iteration_s: float = 0.0  # time an iteration holds the workers, last WINDOW batches
    mean_batch_jobs: float = 0.0  # over the last WINDOW batches
    mean_batch_tokens: float = 0.0

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - self.num_free_blocks


class IterationWindow:
    """Sizes and durations of the last WINDOW batches."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=WINDOW)

    def add(self, elapsed_s: float, num_jobs: int, num_tokens: int) -> None:
        self._samples.append((elapsed_s, num_jobs, num_tokens))

    def means(self) -> tuple[float, float, float]:
        """Mean seconds, jobs and tokens per batch (zeros before the first)."""
        if not self._samples:
            return 0.0, 0.0, 0.0
        n = len(self._samples)
        return (
            sum(s[0] for s in self._samples) / n,
            sum(s[1] for s in self._samples) / n,
            sum(s[2] for s in self._samples) / n,
        )
