"""The scheduler's pure core: job table, KV block accounting, policies, decisions.

Nothing here imports grpc, torch or generated protobuf, so the same code runs in the live
scheduler, in unit tests and in a simulator.
"""

from services.scheduler.core.block_manager import BlockManager
from services.scheduler.core.decision import (
    BlockMove,
    Decision,
    Event,
    EventKind,
    ScheduledChunk,
    SwapResult,
    TokenLogprobs,
)
from services.scheduler.core.job import FinishReason, Job, JobStatus, KvState, SamplingParams
from services.scheduler.core.scheduler import AdmissionError, SchedulerConfig, SchedulerCore

__all__ = [
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
    "SamplingParams",
    "ScheduledChunk",
    "SchedulerConfig",
    "SchedulerCore",
    "SwapResult",
    "TokenLogprobs",
]
