"""Checks a generation request before any work is done; every error names the field.

The sampling settings' rules live with their dataclass (services.common.sampling); this edge
applies the API's defaults, checks the stopping settings and chat messages, and names fields as
the API does. Both surfaces (gRPC `Generate`, OpenAI HTTP) call these same checks: a surface
only turns its wire format into plain values first, and names the fields its own way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import InvalidArgumentError
from services.common.sampling import SamplingError, SamplingParams
from services.frontend.tokenizer import ChatTurn

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_CHAT_MESSAGES = 1024
# Roles a chat message may have: the ones chat templates know. No `tool`: tool calls and tool
# results are not supported, and a template would render one as it pleases or fail.
CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_ECHO_CHARS = 64  # of a client's value quoted back in an error message


def echo(value: str) -> str:
    """A client's value as an error message quotes it: repr'd, and cut short when long, so an
    error never sends a huge value straight back."""
    if len(value) <= MAX_ECHO_CHARS:
        return repr(value)
    return f"{value[:MAX_ECHO_CHARS]!r}… ({len(value)} characters)"


def check_chat(turns: Sequence[ChatTurn], field: str) -> None:
    """Checks a conversation; `field` is what the API calls the message list ("messages" on
    HTTP, "chat.messages" on gRPC), and errors name `field[i].role` and the like."""
    if not turns:
        raise InvalidArgumentError(field, "must not be empty")
    if len(turns) > MAX_CHAT_MESSAGES:
        raise InvalidArgumentError(field, f"at most {MAX_CHAT_MESSAGES} messages, got {len(turns)}")
    for i, turn in enumerate(turns):
        check_role(turn.role, f"{field}[{i}].role")


def check_role(role: str, field: str) -> None:
    if role not in CHAT_ROLES:
        problem = "must not be empty" if not role else f"unsupported role {echo(role)}"
        raise InvalidArgumentError(field, f"{problem}; one of {', '.join(CHAT_ROLES)}")


@dataclass(frozen=True, slots=True)
class SamplingRequest:
    """Sampling and stopping settings after defaults and checks."""

    max_tokens: int | None  # None: fill the remaining context up to the server's default cap
    stop: tuple[str, ...]
    ignore_eos: bool
    params: SamplingParams  # how to pick each token, sent on to the scheduler as it is


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
    """Applies the defaults (temperature 1, top_p 1, no top-k) and checks every setting;
    `top_logprobs_field` is what the API calls top_logprobs (legacy completions: logprobs)."""
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgumentError("max_tokens", f"must be >= 1, got {max_tokens}")
    try:
        params = SamplingParams(
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=0 if top_k is None else top_k,
            seed=seed,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
    except SamplingError as exc:
        field = top_logprobs_field if exc.field == "top_logprobs" else exc.field
        raise InvalidArgumentError(field, exc.problem) from None
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgumentError("stop", f"at most {MAX_STOP_STRINGS} strings")
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidArgumentError(f"stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters")
    return SamplingRequest(
        max_tokens=max_tokens, stop=tuple(stop), ignore_eos=ignore_eos, params=params
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
