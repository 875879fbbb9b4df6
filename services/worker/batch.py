"""What one forward step runs: a chunk of tokens per job, with its block table and sampling.

These are plain descriptions with no torch in them, so the code that builds them (the worker's
server, tests, a simulator) does not have to import the model stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities from the model's distribution (before temperature, top-k, top-p) of a
    sampled token and of the most likely tokens."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to pick the next token from a row of logits."""

    temperature: float = 0.0  # 0 = greedy (argmax); otherwise logits are divided by it
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with cumulative prob >= top_p
    top_k: int = 0  # keep only the k most likely tokens; 0 = disabled
    # When set, the token at position p is drawn from a generator seeded from (seed, p), so
    # re-batching or recomputing a job after preemption samples the same token.
    seed: int | None = None
    logprobs: bool = False  # return the sampled token's log-probability
    top_logprobs: int = 0  # ... and this many most likely alternatives

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def is_greedy(self) -> bool:
        # top_k == 1 keeps one candidate whatever the temperature, so it is argmax too.
        return self.temperature == 0 or self.top_k == 1


GREEDY = Sampling()


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
    sampling: Sampling = field(default=GREEDY)

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
