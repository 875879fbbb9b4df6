"""Checks a generation request before any work is done; every error names the field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.common.errors import InvalidArgumentError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class SamplingRequest:
    """Sampling and stopping settings after defaults and checks."""

    max_tokens: int | None  # None: fill the remaining context up to the server's default cap
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    logprobs: bool = False  # return each token's log-probability ...
    top_logprobs: int = 0  # ... and this many most likely alternatives


def check_sampling(
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: list[str],
    ignore_eos: bool,
    logprobs: bool = False,
    top_logprobs: int = 0,
    top_logprobs_field: str = "top_logprobs",
) -> SamplingRequest:
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgumentError("max_tokens", f"must be >= 1, got {max_tokens}")
    temperature = 1.0 if temperature is None else temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgumentError("temperature", f"must be >= 0, got {temperature}")
    top_p = 1.0 if top_p is None else top_p
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidArgumentError("top_p", f"must be in (0, 1], got {top_p}")
    top_k = 0 if top_k is None else top_k
    if top_k < 0:
        raise InvalidArgumentError("top_k", f"must be >= 0, got {top_k}")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgumentError("stop", f"at most {MAX_STOP_STRINGS} strings")
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidArgumentError(f"stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters")
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgumentError(
            top_logprobs_field, f"must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}"
        )
    if top_logprobs and not logprobs:
        raise InvalidArgumentError(top_logprobs_field, "needs logprobs")
    return SamplingRequest(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def resolve_max_tokens(
    requested: int | None, num_prompt_tokens: int, max_model_len: int, default_cap: int
) -> int:
    """The output budget; raises when the prompt plus max_tokens exceeds the context."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise InvalidArgumentError(
            "prompt",
            f"{num_prompt_tokens} tokens leave no room in the model's context of "
            f"{max_model_len} tokens",
        )
    if requested is None:
        return min(room, default_cap)
    if requested > room:
        raise InvalidArgumentError(
            "max_tokens",
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({requested}) exceeds the "
            f"model's context of {max_model_len} tokens",
        )
    return requested
