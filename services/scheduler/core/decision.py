"""What one iteration does (Decision) and what it tells frontends (Event)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from services.scheduler.core.job import FinishReason, SamplingParams


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """One job's share of an iteration."""

    job_id: str
    token_ids: list[int]  # tokens to run: a prompt chunk, or the last sampled token
    start_pos: int  # tokens already in the job's KV cache (position of token_ids[0])
    block_ids: list[int]  # block table covering start_pos + len(token_ids) tokens
    sample: bool  # sample a next token after this chunk (false for a non-final prompt chunk)
    sampling: SamplingParams  # how to sample


@dataclass(frozen=True, slots=True)
class Decision:
    """Everything the workers must do in one iteration, and nothing else."""

    iteration_id: int  # increasing, starts at 1
    chunks: list[ScheduledChunk]  # the batch, in priority order
    free_job_ids: list[str]  # jobs whose device blocks workers release before running the batch
    events: list[Event] = field(default_factory=list)  # preempted / resumed, known at decision
    # Jobs passed over because they could not get KV blocks even after evicting every job
    # behind them; only these may be overtaken by lower-priority jobs (backfill).
    blocked_job_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.free_job_ids

    @property
    def num_tokens(self) -> int:
        return sum(len(chunk.token_ids) for chunk in self.chunks)


class EventKind(Enum):
    QUEUED = "queued"
    TOKENS = "tokens"
    PREEMPTED = "preempted"
    RESUMED = "resumed"
    FINISHED = "finished"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Event:
    """Something a frontend must hear about one of its jobs."""

    job_id: str
    kind: EventKind
    token_ids: list[int] = field(default_factory=list)  # TOKENS, FINISHED
    queue_level: int = 0  # QUEUED
    finish_reason: FinishReason | None = None  # FINISHED
    error: str = ""  # REJECTED: names the offending field
