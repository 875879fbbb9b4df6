"""A job's sampling settings: their one dataclass, their limits and the rules they must meet.

Standard library only: the scheduler's pure core imports it (and stays mypy-strict), and so do
the frontend, which checks a request against these rules at its edge, and the worker. A
`SamplingParams` is checked when it is built, by `check`, so every service holds only valid
settings and names the offending field when it is handed invalid ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_TOP_LOGPROBS = 20  # most likely alternatives a token's logprobs may list (as OpenAI)
# Highest temperature, as OpenAI's API: past 2 the distribution is close to uniform already,
# and a huge value would overflow the float32 the workers divide logits by.
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**64 - 1  # seeds travel as uint64


class SamplingError(ValueError):
    """A setting that breaks a rule; `field` names it, `problem` says how."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick a job's next token from its row of logits."""

    # 0 = greedy (argmax); otherwise logits are divided by it; at most MAX_TEMPERATURE.
    temperature: float = 0.0
    # Nucleus: keep the smallest set of tokens whose probability reaches top_p; in (0, 1].
    top_p: float = 1.0
    top_k: int = 0  # keep only the k most likely tokens; 0 disables
    # When set, the token at position p is drawn from a generator seeded from (seed, p), so
    # re-batching or recomputing a job after preemption samples the same token.
    seed: int | None = None
    logprobs: bool = False  # return each sampled token's log-probability ...
    top_logprobs: int = 0  # ... and this many most likely alternatives (needs logprobs)

    def __post_init__(self) -> None:
        check(self)

    @property
    def is_greedy(self) -> bool:
        # top_k == 1 keeps one candidate whatever the temperature, so it is argmax too.
        return self.temperature == 0 or self.top_k == 1


def check(params: SamplingParams) -> None:
    """Raises SamplingError naming the first setting that breaks a rule."""
    if not (math.isfinite(params.temperature) and 0 <= params.temperature <= MAX_TEMPERATURE):
        raise SamplingError(
            "temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {params.temperature:g}"
        )
    if not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        raise SamplingError("top_p", f"must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise SamplingError("top_k", f"must be >= 0, got {params.top_k}")
    if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
        raise SamplingError("seed", f"must be in [0, {MAX_SEED}], got {params.seed}")
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        raise SamplingError(
            "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {params.top_logprobs}"
        )
    if params.top_logprobs and not params.logprobs:
        raise SamplingError("top_logprobs", "needs logprobs")


GREEDY = SamplingParams()


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A sampled token's log-probability under the model's distribution (before temperature,
    top-k and top-p), and the most likely alternatives: what the worker computes, the
    scheduler passes on and the frontend returns."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first
