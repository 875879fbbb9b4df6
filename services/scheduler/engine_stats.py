"""EngineStats: the core's stats record, and what only the engine sees (the workers' times and
pools, connected frontends). services/scheduler/stats_table.py says how each is exported."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.core import SchedulerStats


@dataclass(frozen=True, slots=True)
class StageView:
    """One stage's totals, for Stats."""

    stage_index: int
    address: str
    first_layer: int
    num_layers: int
    num_used_blocks: int
    num_commands: int
    busy_s: float
    wait_s: float
    wall_s: float
    num_total_blocks: int = 0  # the stage's own KV pool, from its Info (0: not known yet)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The core's record, and what only the engine sees."""

    core: SchedulerStats = field(default_factory=SchedulerStats)
    mean_forward_s: float = 0.0  # the workers' model time per iteration, last 1000
    num_frontends: int = 0
    num_worker_used_blocks: int = 0  # most blocks any stage reports in use
    swap_out_bytes: int = 0  # moved to the kvstore, all stages
    swap_in_bytes: int = 0
    stages: tuple[StageView, ...] = ()
