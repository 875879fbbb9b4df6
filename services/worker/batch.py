"""What one forward step runs: a chunk of tokens per job, with its block table and sampling.

These are plain descriptions with no torch in them, so the code that builds them (the worker's
server, tests, a simulator) does not have to import the model stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class SeqChunk:
    """The tokens one job runs in this step.

    A prompt may arrive whole or in chunks over several steps (chunked prefill); a decoding job
    runs one token, the one sampled in its previous step.
    """

    job_id: str
    token_ids: Sequence[int]  # tokens to run now: a prompt chunk, or one token when decoding
    start_pos: int  # tokens of this job already in the KV cache = position of token_ids[0]
    # Block table covering start_pos + len(token_ids) tokens: block i holds positions
    # [i * block_size, (i + 1) * block_size). Longer tables are fine; extra blocks are unused.
    block_ids: Sequence[int]
    sample: bool  # sample a next token after this chunk (False for a non-final prompt chunk)
    # How to sample. None: the settings the Executor holds for the job (a command sends them
    # once, see worker.proto); a ModelRunner used on its own then samples greedily.
    sampling: SamplingParams | None = None
    # Async decoding: token_ids is a placeholder for the token this worker sampled for the job
    # in its previous step (the scheduler did not know it yet); the Executor puts it in.
    from_last_sample: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"job {self.job_id}: a chunk needs at least one token")
        if self.start_pos < 0:
            raise ValueError(f"job {self.job_id}: start_pos must be >= 0, got {self.start_pos}")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        """Tokens of this job in the KV cache once the chunk has run."""
        return self.start_pos + len(self.token_ids)

    def num_blocks_needed(self, block_size: int) -> int:
        return -(-self.end_pos // block_size)
