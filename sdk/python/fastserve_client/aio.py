"""Asyncio client for the FastServe Generation service: the twin of `client.Client` on grpc.aio.

Retries and cancellation work as in the sync client. A stream is an async generator whose
`finally` cancels the call; after `break`, Python closes it once it is dropped (asyncio's
async-generator hooks). To cancel at a known point, wrap it in `contextlib.aclosing(...)` or
call its `aclose()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from fastserve.v1 import generation_pb2 as pb
from fastserve.v1 import generation_pb2_grpc as pb_grpc
from fastserve_client import _convert, errors
from fastserve_client.client import (
    DEFAULT_ADDRESS,
    CompletionBuilder,
    Deadline,
    call_metadata,
    retry_delay_s,
)
from fastserve_client.types import ChatMessage, Chunk, Completion, ModelInfo


class AsyncClient:
    """Asyncio FastServe client; use with `async with` or `await close()`.

    Arguments as for `Client`. The channel opens on first use, in the running event loop (a
    grpc.aio channel belongs to one loop), so the client may be built outside of one.
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
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GenerationStub | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; streams still open are cancelled."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    def _get_stub(self) -> pb_grpc.GenerationStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address)
            self._stub = pb_grpc.GenerationStub(self._channel)
        return self._stub

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
    ) -> AsyncIterator[Chunk]:
        """Streams the completion of `prompt` (sent as is), for `async for`; see `Client.generate`.

        Breaking out cancels the generation once the stream is dropped; `aclose()` it (or use
        `contextlib.aclosing`) to cancel at once.
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
    ) -> AsyncIterator[Chunk]:
        """Streams the model's reply to chat `messages` for `async for`; see `Client.chat`."""
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

    async def complete(
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
        async for chunk in self._stream(request, timeout):
            builder.add(chunk)
        return builder.build()

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models this deployment serves."""
        deadline = Deadline(self._timeout if timeout is None else timeout)
        attempt = 0
        while True:
            try:
                response = await self._get_stub().ListModels(
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
            await asyncio.sleep(delay_s)
            attempt += 1

    async def _stream(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[Chunk]:
        deadline = Deadline(self._timeout if timeout is None else timeout)
        attempt = 0
        while True:
            call = self._get_stub().Generate(
                request, timeout=deadline.remaining_s(), metadata=self._metadata
            )
            received_any = False
            try:
                async for response in call:
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
                # Runs when the caller stops early too (aclose, task cancelled): frees the
                # server's job. A no-op once the call has ended.
                call.cancel()
            await asyncio.sleep(delay_s)
            attempt += 1
