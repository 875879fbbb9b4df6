"""Synchronous client for the FastServe Generation service.

Retries: a call that fails with UNAVAILABLE before the server sent anything is retried with
jittered exponential backoff; once a message has arrived it is never retried, since a second
call would generate (and bill) the output again. Cancellation: each stream is a generator whose
`finally` cancels the gRPC call, so a caller that breaks out, closes it or drops it frees the
server's job and its KV cache at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from fastserve.v1 import generation_pb2 as pb
from fastserve.v1 import generation_pb2_grpc as pb_grpc
from fastserve_client import _convert, errors
from fastserve_client.types import (
    ChatMessage,
    Chunk,
    Completion,
    FinishReason,
    ModelInfo,
    TokenLogprob,
    Usage,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"
INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0

Metadata = tuple[tuple[str, str], ...]


class Deadline:
    """An overall time limit, shared by every attempt of one call."""

    def __init__(self, timeout_s: float | None) -> None:
        self.expires_at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining_s(self) -> float | None:
        return None if self.expires_at is None else self.expires_at - time.monotonic()


def retry_delay_s(
    error: grpc.RpcError, *, attempt: int, max_retries: int, deadline: Deadline
) -> float | None:
    """Seconds to wait before retrying a call that failed before any response, or None to stop."""
    if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= max_retries:
        return None
    delay_s = min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * 2**attempt) * random.uniform(0.5, 1.0)
    remaining_s = deadline.remaining_s()
    if remaining_s is not None and remaining_s <= delay_s:
        return None
    return delay_s


def call_metadata(api_key: str | None) -> Metadata | None:
    return None if api_key is None else (("authorization", f"Bearer {api_key}"),)


class CompletionBuilder:
    """Folds the chunks of one stream into a Completion."""

    def __init__(self) -> None:
        self.request_id = ""
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None
        self.priority: int | None = None
        self.priority_capped = False

    def add(self, chunk: Chunk) -> None:
        self.request_id = chunk.request_id or self.request_id
        self.texts.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.priority is not None:
            self.priority, self.priority_capped = chunk.priority, chunk.priority_capped

    def build(self) -> Completion:
        if self.finish_reason is None:
            raise errors.FastServeError(
                grpc.StatusCode.INTERNAL, "the stream ended without a finish reason"
            )
        return Completion(
            request_id=self.request_id,
            text="".join(self.texts),
            token_ids=self.token_ids,
            finish_reason=self.finish_reason,
            usage=self.usage,
            logprobs=self.logprobs,
            priority=self.priority,
            priority_capped=self.priority_capped,
        )


class Client:
    """Synchronous FastServe client; use as a context manager or call `close()`.

    `timeout` (seconds) is the default limit of each call, retries included; `max_retries` bounds
    the retries on UNAVAILABLE; `api_key` is sent as `authorization: Bearer <key>`.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        max_retries: int = 3,
        api_key: str | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.address = address
        self._timeout = timeout
        self._max_retries = max_retries
        self._metadata = call_metadata(api_key)
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; streams still open are cancelled."""
        self._channel.close()

    def generate(
        self,
        prompt: str,
        *,
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
        timeout: float | None = None,
    ) -> Iterator[Chunk]:
        """Streams the completion of `prompt`, sent as is (no chat template).

        Yields state chunks (queued, preempted, running) with empty text, text deltas, and a last
        chunk with `finish_reason` and `usage`. Options left as None take the server's defaults;
        `logprobs=N` adds each token's log-probability and its N most likely alternatives
        (`Chunk.logprobs`, 0 <= N <= 20). `priority` asks for a priority class (a smaller value
        runs first; the deployment caps it to what the API key may use, and the last chunk says
        which class the generation ran in, `Chunk.priority`, and whether it was capped).
        Stopping the iteration early cancels the generation on the server. Raises the typed
        errors of `fastserve_client.errors`.
        """
        request = _convert.generate_request(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            priority=priority,
            model=model,
        )
        return self._stream(request, timeout)

    def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, Any]],
        *,
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
        timeout: float | None = None,
    ) -> Iterator[Chunk]:
        """Streams the model's reply to chat `messages` (ChatMessage or {"role", "content"}).

        The server renders them with the model's chat template. Otherwise as `generate`.
        """
        request = _convert.generate_request(
            messages=messages,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            priority=priority,
            model=model,
        )
        return self._stream(request, timeout)

    def complete(
        self,
        prompt: str | None = None,
        *,
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
        timeout: float | None = None,
    ) -> Completion:
        """Generates from `prompt` or chat `messages` (exactly one) and returns the whole result."""
        request = _convert.generate_request(
            prompt=prompt,
            messages=messages,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            priority=priority,
            model=model,
        )
        builder = CompletionBuilder()
        for chunk in self._stream(request, timeout):
            builder.add(chunk)
        return builder.build()

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models this deployment serves."""
        deadline = Deadline(self._timeout if timeout is None else timeout)
        attempt = 0
        while True:
            try:
                response = self._stub.ListModels(
                    _convert.list_models_request(),
                    timeout=deadline.remaining_s(),
                    metadata=self._metadata,
                )
                return _convert.models_from_pb(response)
            except grpc.RpcError as error:
                delay_s = retry_delay_s(
                    error, attempt=attempt, max_retries=self._max_retries, deadline=deadline
                )
                if delay_s is None:
                    raise errors.from_rpc_error(error) from None
            time.sleep(delay_s)
            attempt += 1

    def _stream(self, request: pb.GenerateRequest, timeout: float | None) -> Iterator[Chunk]:
        deadline = Deadline(self._timeout if timeout is None else timeout)
        attempt = 0
        while True:
            call = self._stub.Generate(
                request, timeout=deadline.remaining_s(), metadata=self._metadata
            )
            received_any = False
            try:
                for response in call:
                    received_any = True
                    yield _convert.chunk_from_pb(response)
                return
            except grpc.RpcError as error:
                delay_s = None
                if not received_any:
                    delay_s = retry_delay_s(
                        error, attempt=attempt, max_retries=self._max_retries, deadline=deadline
                    )
                if delay_s is None:
                    raise errors.from_rpc_error(error) from None
            finally:
                # Runs when the caller stops early too (GeneratorExit): frees the server's job.
                # A no-op once the call has ended.
                call.cancel()
            time.sleep(delay_s)
            attempt += 1
