"""The scheduler's pure core: job table, KV block accounting, policies, decisions.

Nothing here imports grpc, torch or generated protobuf (only the standard library and the pure
services.common.sampling), so the same code runs in the live scheduler, in unit tests and in
the simulator. Modules, from the bottom up:

    job, profile, config       a job; the engine's measured speed; limits and KV policy
    decision, stats            what an iteration does and tells; the stats record
    block_manager, swap_cost   free block ids; swap-versus-recompute costs
    policy, baselines, mlfq    the Policy protocol; FCFS and an oracle; skip-join MLFQ
    policies                   policies by name
    plan, memory               one schedule() call's draft; where each job's KV lives
    scheduler                  SchedulerCore: add_job, schedule, update
"""

from services.common.sampling import SamplingParams, TokenLogprobs
from services.scheduler.core.block_manager import BlockManager
from services.scheduler.core.config import KV_POLICIES, SchedulerConfig
from services.scheduler.core.decision import (
    BlockMove,
    Decision,
    Event,
    EventKind,
    ScheduledChunk,
    SwapResult,
)
from services.scheduler.core.job import FinishReason, Job, JobStatus, KvState
from services.scheduler.core.policy import Policy
from services.scheduler.core.scheduler import AdmissionError, SchedulerCore
from services.scheduler.core.stats import SchedulerStats

__all__ = [
    "KV_POLICIES",
    "AdmissionError",
    "BlockManager",
    "BlockMove",
    "Decision",
    "Event",
    "EventKind",
    "FinishReason",
    "Job",
    "JobStatus",
    "KvState",
    "Policy",
    "SamplingParams",
    "ScheduledChunk",
    "SchedulerConfig",
    "SchedulerCore",
    "SchedulerStats",
    "SwapResult",
    "TokenLogprobs",
]
