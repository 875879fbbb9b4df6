"""OpenAI request bodies -> the frontend's internal request, with strict checks.

Every problem raises `ApiError` (or `InvalidArgumentError`) naming the field as OpenAI's `param`.
Unknown fields are refused rather than ignored, so a typo never silently changes behaviour.
`priority` (vLLM's extra field: a smaller value runs first) picks the priority class
(services/frontend/priority.py). Accepted but not acted on: `user`, and penalties / `echo` /
`suffix` / logprobs only at their neutral values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgumentError
from services.common.sampling import MAX_TOP_LOGPROBS
from services.frontend.tokenizer import ChatTurn
from services.frontend.validation import (
    MAX_ECHO_CHARS,
    SamplingRequest,
    check_chat,
    check_role,
    check_sampling,
)

MAX_INT32 = 2**31 - 1
MAX_UINT64 = 2**64 - 1

_COMMON_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
    "stream_options", "logprobs", "top_k", "ignore_eos", "priority", "user",
    "frequency_penalty", "presence_penalty",
}  # fmt: skip
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}  # sent with the response (Retry-After, WWW-Authenticate)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """A checked completion or chat request."""

    model: str | None
    prompt: str | None  # completions: text ...
    prompt_ids: list[int] | None  # ... or token ids
    messages: list[ChatTurn] | None  # chat
    sampling: SamplingRequest
    stream: bool
    include_usage: bool
    priority: int | None  # None: not sent


def _reject_constant(name: str) -> float:
    raise ApiError(400, f"invalid JSON: {name} is not a number", param=None, code="invalid_json")


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, f"body is not valid UTF-8 (byte {exc.start})", code="invalid_json"
        ) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ApiError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"invalid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return data


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(name, f"must be a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(name, "contains a lone surrogate (not valid UTF-8)") from None
    return value


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(name, f"must be an integer, got {_kind(value)}")
    if not low <= value <= high:
        raise InvalidArgumentError(name, f"must be in [{low}, {high}], got {value}")
    return value


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(name, f"must be a number, got {_kind(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidArgumentError(name, f"must be finite, got {value}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(name, f"must be true or false, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _unknown(name: str) -> InvalidArgumentError:
    """An unknown field, its name cut short: the name is the client's and may be huge."""
    if len(name) > MAX_ECHO_CHARS:
        name = name[:MAX_ECHO_CHARS] + "…"
    return InvalidArgumentError(name, "unknown field")


def _opt(body: dict[str, Any], name: str, parse, *args):
    value = body.get(name)
    return None if value is None else parse(value, name, *args)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [_string(value, "stop")]
    if isinstance(value, list):
        return [_string(s, f"stop[{i}]") for i, s in enumerate(value)]
    raise InvalidArgumentError("stop", f"must be a string or a list of strings, got {_kind(value)}")


def _common(
    body: dict[str, Any],
    allowed: set[str],
    max_tokens_field: str,
    logprobs: tuple[bool, int, str] = (False, 0, "top_logprobs"),
) -> dict[str, Any]:
    for name in body:
        if name not in allowed:
            raise _unknown(name)
    n = _opt(body, "n", _int, -MAX_INT32, MAX_INT32)
    if n is not None and n != 1:
        raise InvalidArgumentError("n", f"only n = 1 is supported, got {n}")
    for name in ("frequency_penalty", "presence_penalty"):
        value = _opt(body, name, _float)
        if value not in (None, 0.0):
            raise InvalidArgumentError(name, "is not supported (only 0)")
    max_tokens = _opt(body, max_tokens_field, _int, -MAX_INT32, MAX_INT32)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgumentError(max_tokens_field, f"must be >= 1, got {max_tokens}")
    seed = _opt(body, "seed", _int, 0, MAX_UINT64)
    top_k = _opt(body, "top_k", _int, -1, MAX_INT32)
    if top_k == -1:  # vLLM's spelling of "no top-k"
        top_k = 0
    sampling = check_sampling(
        max_tokens=max_tokens,
        temperature=_opt(body, "temperature", _float),
        top_p=_opt(body, "top_p", _float),
        top_k=top_k,
        seed=seed,
        stop=_stop(body.get("stop")),
        ignore_eos=_opt(body, "ignore_eos", _bool) or False,
        logprobs=logprobs[0],
        top_logprobs=logprobs[1],
        top_logprobs_field=logprobs[2],
    )
    stream = _opt(body, "stream", _bool) or False
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidArgumentError("stream_options", f"must be an object, got {_kind(options)}")
        for name in options:
            if name != "include_usage":
                raise _unknown(f"stream_options.{name}")
        include_usage = _opt(options, "include_usage", _bool) or False
        if not stream:
            raise InvalidArgumentError("stream_options", "only allowed when stream is true")
    _opt(body, "user", _string)
    return dict(
        model=_opt(body, "model", _string),
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        priority=_opt(body, "priority", _int, -MAX_INT32, MAX_INT32),
    )


def parse_completion(body: dict[str, Any]) -> OpenAIRequest:
    # Completions: logprobs = N asks for the sampled token's logprob and N alternatives.
    top = _opt(body, "logprobs", _int, -MAX_INT32, MAX_INT32)
    if top is not None and top < 0:
        raise InvalidArgumentError("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    common = _common(body, COMPLETION_FIELDS, "max_tokens", (top is not None, top or 0, "logprobs"))
    if body.get("echo") not in (None, False):
        raise InvalidArgumentError("echo", "is not supported (only false)")
    if body.get("suffix") is not None:
        raise InvalidArgumentError("suffix", "is not supported")
    best_of = _opt(body, "best_of", _int, -MAX_INT32, MAX_INT32)
    if best_of not in (None, 1):
        raise InvalidArgumentError("best_of", "only best_of = 1 is supported")
    prompt, prompt_ids = _prompt(body.get("prompt"))
    return OpenAIRequest(prompt=prompt, prompt_ids=prompt_ids, messages=None, **common)


def _prompt(value: Any) -> tuple[str | None, list[int] | None]:
    if value is None:
        raise InvalidArgumentError("prompt", "is required")
    if isinstance(value, str):
        if not value:
            raise InvalidArgumentError("prompt", "must not be empty")
        return _string(value, "prompt"), None
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            if len(value) != 1:
                raise InvalidArgumentError("prompt", "batched prompts are not supported; send one")
            return _prompt(value[0])
        ids = [_int(v, f"prompt[{i}]", 0, MAX_INT32) for i, v in enumerate(value)]
        return None, ids
    raise InvalidArgumentError(
        "prompt", f"must be a non-empty string or list of token ids, got {_kind(value)}"
    )


def parse_chat(body: dict[str, Any]) -> OpenAIRequest:
    max_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if "max_completion_tokens" in body and body.get("max_tokens") is not None:
        raise InvalidArgumentError(
            "max_tokens", "set max_tokens or max_completion_tokens, not both"
        )
    # Chat: logprobs = true asks for each token's logprob, top_logprobs = N for alternatives.
    logprobs = _opt(body, "logprobs", _bool) or False
    top = _opt(body, "top_logprobs", _int, -MAX_INT32, MAX_INT32) or 0
    common = _common(body, CHAT_FIELDS, max_field, (logprobs, top, "top_logprobs"))
    return OpenAIRequest(
        prompt=None, prompt_ids=None, messages=_messages(body.get("messages")), **common
    )


def _messages(value: Any) -> list[ChatTurn]:
    """JSON shapes only; what a conversation may hold is `check_chat`'s, as on gRPC."""
    if not isinstance(value, list):
        raise InvalidArgumentError("messages", f"must be a non-empty list, got {_kind(value)}")
    turns = []
    for i, message in enumerate(value):
        name = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidArgumentError(name, f"must be an object, got {_kind(message)}")
        for key in message:
            if key not in ("role", "content", "name"):
                raise _unknown(f"{name}.{key}")
        role = _string(message.get("role"), f"{name}.role")
        check_role(role, f"{name}.role")  # before the content, so the role is named first
        turns.append(ChatTurn(role, _content(message.get("content"), f"{name}.content")))
    check_chat(turns, "messages")
    return turns


def _content(value: Any, name: str) -> str:
    if isinstance(value, str):
        return _string(value, name)
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            part_name = f"{name}[{i}]"
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidArgumentError(part_name, "only text parts are supported")
            parts.append(_string(part.get("text"), f"{part_name}.text"))
        return "".join(parts)
    raise InvalidArgumentError(
        name, f"must be a string or a list of text parts, got {_kind(value)}"
    )
