"""The one module that builds and reads protobuf messages; the rest of the SDK uses dataclasses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastserve.v1 import generation_pb2 as pb
from fastserve_client.types import (
    ChatMessage,
    Chunk,
    FinishReason,
    JobState,
    ModelInfo,
    TokenLogprob,
    Usage,
)

_FINISH_REASONS: dict[int, FinishReason] = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORTED: "aborted",
}
_STATES: dict[int, JobState] = {
    pb.JOB_STATE_QUEUED: "queued",
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_PREEMPTED: "preempted",
}


def generate_request(
    *,
    prompt: str | None = None,
    messages: Sequence[ChatMessage | Mapping[str, Any]] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Iterable[str] | None = None,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    priority: int | None = None,
    model: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest; optional values left as None stay unset so the server's defaults apply.
    `logprobs`: None for none, N for each token's log-probability and N alternatives."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt and messages")
    request = pb.GenerateRequest(model=model, ignore_eos=ignore_eos, stop=_stop_list(stop))
    if prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be str, not {type(prompt).__name__}")
        request.prompt = prompt
    else:
        assert messages is not None
        request.chat.CopyFrom(pb.ChatInput(messages=[_chat_message(m) for m in messages]))
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if top_k is not None:
        request.top_k = top_k
    if seed is not None:
        request.seed = seed
    if priority is not None:
        request.priority = priority
    if logprobs is not None:
        request.logprobs = True
        request.top_logprobs = logprobs
    return request


def _stop_list(stop: str | Iterable[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    stops = list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise TypeError("stop must be a str or a list of str")
    return stops


def _chat_message(message: ChatMessage | Mapping[str, Any]) -> pb.ChatMessage:
    if isinstance(message, ChatMessage):
        return pb.ChatMessage(role=message.role, content=message.content)
    if isinstance(message, Mapping):
        try:
            checked = ChatMessage(role=message["role"], content=message["content"])
        except KeyError as missing:
            raise ValueError(f"chat message is missing {missing}") from None
        return pb.ChatMessage(role=checked.role, content=checked.content)
    raise TypeError(f"chat message must be ChatMessage or dict, not {type(message).__name__}")


def list_models_request() -> pb.ListModelsRequest:
    return pb.ListModelsRequest()


def chunk_from_pb(response: pb.GenerateResponse) -> Chunk:
    state = _STATES.get(response.state)
    return Chunk(
        request_id=response.request_id,
        text=response.text,
        token_ids=list(response.token_ids),
        logprobs=[
            TokenLogprob(
                token_id=token,
                logprob=lp.logprob,
                top=[(t.token_id, t.logprob) for t in lp.top],
            )
            for token, lp in zip(response.token_ids, response.logprobs, strict=False)
        ],
        finish_reason=_FINISH_REASONS.get(response.finish_reason),
        usage=(
            Usage(
                prompt_tokens=response.usage.prompt_tokens,
                completion_tokens=response.usage.completion_tokens,
                cached_prompt_tokens=response.usage.cached_prompt_tokens,
            )
            if response.HasField("usage")
            else None
        ),
        state=state,
        queue_level=response.queue_level if state == "queued" else None,
        priority=response.priority if response.finish_reason else None,
        priority_capped=response.priority_capped,
    )


def models_from_pb(response: pb.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(
            name=card.name,
            max_context_tokens=card.max_context_tokens,
            has_chat_template=card.has_chat_template,
        )
        for card in response.models
    ]
