"""What the client returns: plain frozen dataclasses, free of protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "aborted"]
JobState = Literal["queued", "running", "preempted"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a finished generation."""

    # Tokens in the prompt after templating.
    prompt_tokens: int
    # Tokens generated, including a final end-of-sequence token.
    completion_tokens: int
    # Of prompt_tokens, those whose KV the server found in its prefix cache.
    cached_prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability (from the model's distribution before temperature,
    top-k and top-p) and the most likely alternatives."""

    token_id: int
    logprob: float
    # (token id, logprob) of the most likely tokens, most likely first.
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One message of a generation stream: a text delta, a state change, or the last message."""

    # Server-assigned id of the generation; the same on every chunk of a stream.
    request_id: str
    # Text generated since the previous chunk (empty on state changes).
    text: str = ""
    # Token ids generated since the previous chunk.
    token_ids: list[int] = field(default_factory=list)
    # Why the generation ended; set on the last chunk only.
    finish_reason: FinishReason | None = None
    # Token counts; set on the last chunk only.
    usage: Usage | None = None
    # Scheduling state when it changed: "queued", "preempted", or "running" (resumed).
    state: JobState | None = None
    # Queue level (0 is the highest priority) when state is "queued".
    queue_level: int | None = None
    # One per token id, when the request asked for logprobs.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # On the last chunk: the priority class the generation ran in (0 runs first), and whether
    # that is lower than the one asked for because the API key may not use it.
    priority: int | None = None
    priority_capped: bool = False


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole generation, assembled from its chunks."""

    # Server-assigned id of the generation.
    request_id: str
    # All generated text.
    text: str
    # All generated token ids.
    token_ids: list[int]
    # Why the generation ended.
    finish_reason: FinishReason
    # Token counts, when the server reported them.
    usage: Usage | None
    # One per token id, when the request asked for logprobs.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # The priority class it ran in, and whether the API key's right capped the one asked for.
    priority: int | None = None
    priority_capped: bool = False


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a chat conversation."""

    # Author role: "system", "user", "assistant" (whatever the model's chat template accepts).
    role: str
    # Message text.
    content: str

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or not isinstance(self.content, str):
            raise TypeError("ChatMessage role and content must be str")


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model the deployment serves."""

    # Name to pass as `model=`.
    name: str
    # Longest prompt plus output, in tokens.
    max_context_tokens: int
    # Whether chat input is accepted (the model has a chat template).
    has_chat_template: bool
