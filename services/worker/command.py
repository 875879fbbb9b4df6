"""A worker command and its result as plain dataclasses, with no protobuf and no torch in them.

`Executor.run` takes a `Command` and returns a `CommandResult`: the worker's gRPC edge converts
protobuf to and from these (services/worker/server.py), and tests and the in-process pipeline
(testing/local_pipeline.py) hand them to the executor directly, so there is one way to apply a
scheduler's decision to a worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.sampling import TokenLogprobs
from services.worker.batch import SeqChunk


@dataclass(frozen=True, slots=True)
class BlockMove:
    """One job's device blocks to swap out (the source) or in (the target)."""

    job_id: str
    block_ids: Sequence[int]


@dataclass(frozen=True, slots=True)
class Step:
    """Run the model over a batch; each chunk's sampling settings may be omitted once the
    worker holds the job's (see worker.proto, SeqInput.sampling)."""

    seqs: Sequence[SeqChunk]


@dataclass(frozen=True, slots=True)
class Free:
    """Release jobs' blocks and forget them (their kvstore copies and sampling settings)."""

    job_ids: Sequence[str]


@dataclass(frozen=True, slots=True)
class Reset:
    """Forget every job; with several stages, (re)form the activation group under this id."""

    pipeline_id: str = ""


@dataclass(frozen=True, slots=True)
class Command:
    """One command, applied in this order: free `free_first`, start `swap_out` (the blocks are
    copied off the device at once), start `swap_in`, then `action`."""

    action: Step | Free | Reset | None = None
    free_first: Sequence[str] = ()
    swap_out: Sequence[BlockMove] = ()
    swap_in: Sequence[BlockMove] = ()


@dataclass(frozen=True, slots=True)
class SwapDone:
    """A background swap that finished, successfully or not."""

    job_id: str
    swap_in: bool  # False: a swap-out
    ok: bool
    error: str = ""
    num_bytes: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What one stage did. `error` is set when the command failed (it names the field); the
    worker's state fields are filled in either way."""

    tokens: list[tuple[str, int]] = field(default_factory=list)  # (job id, token): last stage
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # jobs that asked
    forward_s: float = 0.0  # this stage's compute, without the wait for the previous stage
    wait_s: float = 0.0  # waiting for the previous stage's activations
    total_s: float = 0.0  # the whole command
    swaps_done: list[SwapDone] = field(default_factory=list)  # since the previous command
    num_swaps_in_flight: int = 0  # after the command
    num_used_blocks: int = 0  # blocks held by jobs after the command
    error: str = ""
