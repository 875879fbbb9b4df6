"""What one iteration does (Decision) and what it tells frontends (Event)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from services.common.sampling import SamplingParams, TokenLogprobs
from services.scheduler.core.job import FinishReason


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """One job's share of an iteration."""

    job_id: str
    token_ids: list[int]  # tokens to run: a prompt chunk, or the last sampled token
    start_pos: int  # tokens already in the job's KV cache (position of token_ids[0])
    block_ids: list[int]  # block table covering start_pos + len(token_ids) tokens
    sample: bool  # sample a next token after this chunk (false for a non-final prompt chunk)
    # How to sample: sent with a job's first chunk after the workers last forgot the job (it
    # started, was recomputed, or the workers were reset); None when they hold it already.
    sampling: SamplingParams | None
    # Async decoding: the job's token at start_pos is the one the worker samples for it in the
    # step before (not known when this was scheduled); token_ids holds a placeholder.
    from_last_sample: bool = False


@dataclass(frozen=True, slots=True)
class BlockMove:
    """One job's blocks to move between device and kvstore."""

    job_id: str
    block_ids: list[int]  # device blocks: the source of a swap-out, the target of a swap-in


@dataclass(frozen=True, slots=True)
class SwapResult:
    """A finished background swap, as the worker reports it."""

    job_id: str
    swap_in: bool  # False: a swap-out
    ok: bool  # False: the kvstore refused or lost the blocks; the job is recomputed
    num_bytes: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """Everything the workers must do in one iteration, and nothing else."""

    iteration_id: int  # increasing, starts at 1
    chunks: list[ScheduledChunk]  # the batch, in priority order
    free_job_ids: list[str]  # jobs whose device blocks workers release before running the batch
    events: list[Event] = field(default_factory=list)  # preempted / resumed, known at decision
    # Jobs passed over because their KV could not be on the device this iteration: no blocks
    # even after evicting every job behind them, or a swap not finished. Only these may be
    # overtaken by lower-priority jobs (backfill).
    blocked_job_ids: list[str] = field(default_factory=list)
    # Copied off the device before the batch runs (the batch may reuse the blocks).
    swap_out: list[BlockMove] = field(default_factory=list)
    # Started in the background; the jobs run once the worker reports them done.
    swap_in: list[BlockMove] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.chunks or self.free_job_ids or self.swap_out or self.swap_in)

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
    owner: str = ""  # the job's owner (Job.owner), whom the event goes to
    token_ids: list[int] = field(default_factory=list)  # TOKENS, FINISHED
    queue_level: int = 0  # QUEUED
    finish_reason: FinishReason | None = None  # FINISHED
    error: str = ""  # REJECTED: names the offending field
    retry: bool = False  # REJECTED only for now (shutting down): the client should retry
    # TOKENS, FINISHED: prompt tokens its first prefill found in the prefix cache.
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, if asked
