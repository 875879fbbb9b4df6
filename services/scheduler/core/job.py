"""A job: one generation request as the scheduler tracks it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from services.common.sampling import SamplingParams

MAX_PRIORITY_CLASSES = 16  # priority classes 0 .. 15


class JobStatus(Enum):
    WAITING = "waiting"  # admitted, never ran
    RUNNING = "running"  # in the last iteration's batch
    PREEMPTED = "preempted"  # ran before, not in the last batch
    FINISHED = "finished"


class KvState(Enum):
    """Where a job's KV cache is."""

    NONE = "none"  # nowhere: the job (re)computes from its token ids
    DEVICE = "device"  # in its device blocks
    SWAPPING_OUT = "swapping_out"  # copied off the device, on its way to the kvstore
    HOST = "host"  # in the kvstore
    SWAPPING_IN = "swapping_in"  # on its way back into device blocks allocated for it

    @property
    def is_runnable(self) -> bool:
        return self in (KvState.NONE, KvState.DEVICE)


class FinishReason(Enum):
    STOP = "stop"  # a stop token was sampled
    LENGTH = "length"  # max_tokens reached, or the context is full
    CANCELLED = "cancelled"  # the frontend cancelled it
    ABORTED = "aborted"  # the scheduler gave up on it


@dataclass(slots=True)
class Job:
    job_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    owner: str = ""  # who submitted it and hears its events (a frontend's connection id)
    # Priority class: class 0 runs first; a job of a lower class (a larger number) gets only
    # what the higher ones leave, and is preempted for them (core/priority.py).
    priority: int = 0
    arrival_time: float = 0.0
    # Mutable state, owned by SchedulerCore.
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the job's device blocks
    block_ids: list[int] = field(default_factory=list)  # block table, identical on every stage
    status: JobStatus = JobStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0  # times its KV was dropped and recomputed
    kv_state: KvState = KvState.NONE
    num_host_blocks: int = 0  # blocks held in the kvstore while swapped out
    num_swaps: int = 0  # swap-outs so far
    sampling_sent: bool = False  # the workers hold its sampling settings
    # Prefix caching (BlockManager): names of its full blocks, as far as computed; how many of
    # its table's blocks are named in the cache; while swapped out, how many leading blocks it
    # left on the device, shared with others, to take back by name.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_shared_blocks: int = 0
    # Prompt tokens found in the prefix cache when it first ran (an estimate before that).
    num_cached_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0 <= self.priority < MAX_PRIORITY_CLASSES:
            raise ValueError(f"priority must be in [0, {MAX_PRIORITY_CLASSES - 1}]")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncached_prompt_tokens(self) -> int:
        """Prompt tokens still to compute, counting those the prefix cache holds as done."""
        done = max(self.num_computed_tokens, self.num_cached_tokens)
        return max(self.num_prompt_tokens - done, 0)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Token ids [start, stop) of prompt + output."""
        num_prompt = len(self.prompt_token_ids)
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : stop - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - num_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status is JobStatus.FINISHED
