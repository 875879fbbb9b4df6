"""Every figure the scheduler exports, once: name, type, help and where to read it.

One table drives both the Stats RPC (which the frontends re-export on their /metrics) and the
scheduler's own /metrics port, so a new figure is a field in the stats record and a line here.
Names carry no prefix: both exporters add `fastserve_scheduler_`; Prometheus adds `_total` to
counters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from services.common.metric_family import Samples
from services.scheduler.engine_stats import EngineStats

PREFIX = "fastserve_scheduler_"


class Kind(Enum):
    COUNTER = "counter"  # a total since the scheduler started
    GAUGE = "gauge"  # a value now


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    kind: Kind
    help: str
    read: Callable[[EngineStats], float | Samples]  # one value, or one per label set

    def samples(self, stats: EngineStats) -> Samples:
        value = self.read(stats)
        return value if isinstance(value, list) else [({}, float(value))]


def _counter(name: str, help: str, read: Callable[[EngineStats], float | Samples]) -> Series:
    return Series(name, Kind.COUNTER, help, read)


def _gauge(name: str, help: str, read: Callable[[EngineStats], float | Samples]) -> Series:
    return Series(name, Kind.GAUGE, help, read)


def _per_level(s: EngineStats) -> Samples:
    return [({"level": str(level)}, n) for level, n in enumerate(s.core.num_jobs_per_level)]


def _per_class(s: EngineStats) -> Samples:
    return [
        ({"priority": str(c), "state": state}, n)
        for c, waiting, running in s.core.num_jobs_per_class
        for state, n in (("waiting", waiting), ("running", running))
    ]


def _per_stage(read: Callable[..., float], known_only: bool = False) -> Callable[..., Samples]:
    """One sample per pipeline stage; `known_only` skips stages that have not answered Info."""

    def samples(s: EngineStats) -> Samples:
        return [
            ({"stage": str(view.stage_index)}, float(read(view)))
            for view in s.stages
            if view.num_total_blocks or not known_only
        ]

    return samples


def _stage_info(s: EngineStats) -> Samples:
    return [
        (
            {
                "stage": str(v.stage_index),
                "address": v.address,
                "first_layer": str(v.first_layer),
                "num_layers": str(v.num_layers),
            },
            1.0,
        )
        for v in s.stages
    ]


TABLE: tuple[Series, ...] = (
    _counter("iterations", "Scheduler iterations run", lambda s: s.core.counters.num_iterations),
    _counter("submitted_jobs", "Jobs submitted", lambda s: s.core.counters.num_submitted_jobs),
    _counter("finished_jobs", "Jobs finished", lambda s: s.core.counters.num_finished_jobs),
    _counter("cancelled_jobs", "Jobs cancelled", lambda s: s.core.counters.num_cancelled_jobs),
    _counter("rejected_jobs", "Jobs rejected", lambda s: s.core.counters.num_rejected_jobs),
    _counter(
        "preemptions",
        "Running jobs that dropped out of the batch",
        lambda s: s.core.counters.num_preemptions,
    ),
    _counter(
        "recomputed_jobs", "Preemptions by recompute", lambda s: s.core.counters.num_recomputed_jobs
    ),
    _counter(
        "swapped_out_jobs",
        "Preemptions by swap-out",
        lambda s: s.core.counters.num_swapped_out_jobs,
    ),
    _counter(
        "swapped_in_jobs", "Swap-ins completed", lambda s: s.core.counters.num_swapped_in_jobs
    ),
    _counter(
        "swap_failures",
        "Swaps the kvstore refused or lost (those jobs were recomputed)",
        lambda s: s.core.counters.num_swap_failures,
    ),
    _counter(
        "swap_out_bytes", "Bytes swapped out to the kvstore, all stages", lambda s: s.swap_out_bytes
    ),
    _counter(
        "swap_in_bytes", "Bytes swapped in from the kvstore, all stages", lambda s: s.swap_in_bytes
    ),
    _counter(
        "prefix_cache_query_tokens",
        "Tokens of jobs that looked up the prefix cache as they started (or restarted)",
        lambda s: s.core.counters.num_prefix_query_tokens,
    ),
    _counter(
        "prefix_cache_hit_tokens",
        "Of those, tokens whose KV was found cached, by tier (device: in the KV pool; host: in "
        "the kvstore, read back)",
        lambda s: [
            ({"tier": "device"}, s.core.counters.num_prefix_hit_tokens),
            ({"tier": "host"}, s.core.counters.num_prefix_host_hit_tokens),
        ],
    ),
    _gauge("waiting_jobs", "Jobs waiting (all queue levels)", lambda s: s.core.num_waiting_jobs),
    _gauge(
        "running_jobs", "Jobs in flight or in the last batch", lambda s: s.core.num_running_jobs
    ),
    _gauge(
        "priority_class_jobs",
        "Jobs per priority class (0 runs first), waiting or running; every class up to the "
        "largest seen",
        _per_class,
    ),
    _gauge(
        "preempted_jobs",
        "Jobs that ran before and are not running now",
        lambda s: s.core.num_preempted_jobs,
    ),
    _gauge(
        "host_jobs", "Preempted jobs whose KV is in the kvstore", lambda s: s.core.num_host_jobs
    ),
    _gauge("swaps_in_flight", "Swaps started and not done", lambda s: s.core.num_swaps_in_flight),
    _gauge("frontends", "Connected frontends", lambda s: s.num_frontends),
    _gauge("kv_blocks_total", "Device KV blocks", lambda s: s.core.num_total_blocks),
    _gauge("kv_blocks_free", "Device KV blocks free", lambda s: s.core.num_free_blocks),
    _gauge("kv_blocks_used", "Device KV blocks in use", lambda s: s.core.num_used_blocks),
    _gauge(
        "kv_blocks_cached",
        "Device KV blocks named in the prefix cache, in use or free to evict",
        lambda s: s.core.num_cached_blocks,
    ),
    _gauge(
        "kv_blocks_host_cached",
        "Cached prefix blocks kept in the kvstore after leaving the device (or on their way)",
        lambda s: s.core.num_host_cached_blocks,
    ),
    _gauge(
        "worker_kv_blocks_used",
        "KV blocks the workers report in use (checks the scheduler's accounting)",
        lambda s: s.num_worker_used_blocks,
    ),
    _gauge(
        "swap_bytes_per_second",
        "Estimated swap bandwidth, one direction",
        lambda s: s.core.swap_bytes_per_s,
    ),
    _gauge(
        "mean_batch_jobs",
        "Mean jobs in a batch, last 1000 batches",
        lambda s: s.core.mean_batch_jobs,
    ),
    _gauge(
        "mean_batch_tokens",
        "Mean tokens (prefill chunks + decodes) in a batch, last 1000 batches",
        lambda s: s.core.mean_batch_tokens,
    ),
    _gauge(
        "mean_iteration_seconds",
        "Mean wall time an iteration holds the workers (from its schedule, or the previous "
        "iteration's results if later, to its results), last 1000 batches",
        lambda s: s.core.mean_iteration_s,
    ),
    _gauge(
        "mean_forward_seconds",
        "Mean worker forward time per iteration, all stages, last 1000 iterations",
        lambda s: s.mean_forward_s,
    ),
    _gauge("queue_depth", "Waiting jobs per queue level (0: highest)", _per_level),
    _gauge(
        "stage_info",
        "One series per pipeline stage: its worker address and layers (value 1)",
        _stage_info,
    ),
    _gauge(
        "stage_kv_blocks_used",
        "KV blocks the stage reports in use",
        _per_stage(lambda v: v.num_used_blocks),
    ),
    _gauge(
        "stage_kv_blocks_free",
        "KV blocks of the stage's own pool not in use (its total minus used)",
        _per_stage(lambda v: v.num_total_blocks - v.num_used_blocks, known_only=True),
    ),
    _counter("stage_commands", "Commands the stage answered", _per_stage(lambda v: v.num_commands)),
    _counter(
        "stage_busy_seconds", "Time the stage spent computing", _per_stage(lambda v: v.busy_s)
    ),
    _counter(
        "stage_wait_seconds",
        "Time the stage waited for the previous stage's activations",
        _per_stage(lambda v: v.wait_s),
    ),
    _gauge(
        "stage_wall_seconds",
        "Time since the stage's first command (idle fraction: 1 - busy / wall)",
        _per_stage(lambda v: v.wall_s),
    ),
)
