"""The public gRPC edge: Generation.Generate and ListModels (asyncio)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from fastserve.v1 import generation_pb2 as pb
from services.common.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from services.common.wire import find_invalid_utf8
from services.frontend.generation import RETRY_AFTER_S, GenerationCore
from services.frontend.tokenizer import ChatTurn
from services.frontend.validation import SamplingRequest, check_chat, check_sampling, echo

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
# Trailing metadata of a RESOURCE_EXHAUSTED or UNAVAILABLE status: seconds to wait before
# retrying (as HTTP's Retry-After; the SDK reads it into the error's `retry_after_s`).
RETRY_AFTER_KEY = "retry-after"


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A request protobuf refused to parse; kept so the handler can say why."""

    data: bytes


def parse_generate_request(data: bytes) -> pb.GenerateRequest | Undecodable:
    try:
        return pb.GenerateRequest.FromString(data)
    except Exception:
        return Undecodable(data)


def _raise_undecodable(request: Undecodable) -> None:
    try:
        field = find_invalid_utf8(pb.GenerateRequest.DESCRIPTOR, request.data)
    except ValueError:
        field = None
    if field:
        raise InvalidArgumentError(field, "not valid UTF-8")
    raise InvalidArgumentError("request", "not a valid GenerateRequest message")


class GenerationServicer:
    def __init__(self, core: GenerationCore):
        self._core = core
        self._model = core.model

    def handlers(self) -> grpc.GenericRpcHandler:
        """Registered by hand so Generate can use a deserializer that survives bad UTF-8."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Generate": grpc.unary_stream_rpc_method_handler(
                    self.Generate,
                    request_deserializer=parse_generate_request,
                    response_serializer=pb.GenerateResponse.SerializeToString,
                ),
                "ListModels": grpc.unary_unary_rpc_method_handler(
                    self.ListModels,
                    request_deserializer=pb.ListModelsRequest.FromString,
                    response_serializer=pb.ListModelsResponse.SerializeToString,
                ),
            },
        )

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelCard(
                    name=self._model.name,
                    max_context_tokens=self._model.max_model_len,
                    has_chat_template=self._model.has_chat_template,
                )
            ]
        )

    def _prepare(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingRequest]:
        if not self._model.source.matches(request.model):
            raise InvalidArgumentError("model", f"unknown model {echo(request.model)}")
        sampling = check_sampling(
            max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
            temperature=request.temperature if request.HasField("temperature") else None,
            top_p=request.top_p if request.HasField("top_p") else None,
            top_k=request.top_k if request.HasField("top_k") else None,
            seed=request.seed if request.HasField("seed") else None,
            stop=list(request.stop),
            ignore_eos=request.ignore_eos,
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
        )
        kind = request.WhichOneof("input")
        if kind == "prompt":
            if not request.prompt:
                raise InvalidArgumentError("prompt", "must not be empty")
            self._core.check_prompt_chars("prompt", len(request.prompt))
            prompt_ids = self._model.encode_prompt(request.prompt)
        elif kind == "chat":
            turns = [ChatTurn(m.role, m.content) for m in request.chat.messages]
            check_chat(turns, "chat.messages")
            num_chars = sum(len(t.role) + len(t.content) for t in turns)
            self._core.check_prompt_chars("chat.messages", num_chars)
            prompt_ids = self._model.encode_chat(turns)
        else:
            raise InvalidArgumentError("prompt", "one of prompt or chat is required")
        return prompt_ids, sampling

    async def Generate(self, request, context) -> AsyncIterator[pb.GenerateResponse]:
        try:
            # aclosing: a client that goes away must close the generation now (cancelling
            # its job), not whenever the garbage collector finalizes it.
            async with aclosing(self._generate(request, context)) as responses:
                async for response in responses:
                    yield response
        except (ResourceExhaustedError, UnavailableError):
            # Kept when the error interceptor aborts with the status code.
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(RETRY_AFTER_S)),))
            raise

    async def _generate(self, request, context) -> AsyncIterator[pb.GenerateResponse]:
        if isinstance(request, Undecodable):
            _raise_undecodable(request)
        prompt_ids, sampling = self._prepare(request)
        metadata = dict(context.invocation_metadata() or ())
        priority = self._core.grant_priority(
            request.priority if request.HasField("priority") else None,
            metadata.get("authorization"),
        )
        prepared = self._core.prepare(prompt_ids, sampling, priority)
        async with aclosing(self._core.generate(prepared)) as deltas:
            async for delta in deltas:
                response = pb.GenerateResponse(request_id=delta.job_id)
                if delta.state is not None:
                    response.state = _STATE[delta.state]
                    response.queue_level = delta.queue_level
                    yield response
                    continue
                response.text = delta.text
                response.token_ids.extend(delta.token_ids)
                response.logprobs.extend(
                    pb.TokenLogprobs(
                        logprob=lp.logprob,
                        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
                    )
                    for lp in delta.logprobs
                )
                if delta.finish_reason:
                    response.finish_reason = _FINISH[delta.finish_reason]
                    response.usage.prompt_tokens = delta.num_prompt_tokens
                    response.usage.completion_tokens = delta.num_completion_tokens
                    response.usage.cached_prompt_tokens = delta.num_cached_tokens
                    response.priority = delta.priority.priority
                    response.priority_capped = delta.priority.capped
                yield response


_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "aborted": pb.FINISH_REASON_ABORTED,
}
_STATE = {
    "queued": pb.JOB_STATE_QUEUED,
    "preempted": pb.JOB_STATE_PREEMPTED,
    "running": pb.JOB_STATE_RUNNING,
}
