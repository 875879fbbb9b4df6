"""The public gRPC edge: Generation.Generate and ListModels (asyncio)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from fastserve.scheduler.v1 import scheduler_pb2 as spb
from fastserve.v1 import generation_pb2 as pb
from services.common.errors import InvalidArgumentError, UnavailableError
from services.common.wire import find_invalid_utf8
from services.frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.frontend.scheduler_link import LinkLost, SchedulerLink
from services.frontend.tokenizer import ChatTurn, ModelTokenizer
from services.frontend.validation import SamplingRequest, check_sampling, resolve_max_tokens

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name

_FINISH = {
    spb.FINISH_REASON_STOP: pb.FINISH_REASON_STOP,
    spb.FINISH_REASON_LENGTH: pb.FINISH_REASON_LENGTH,
    spb.FINISH_REASON_CANCELLED: pb.FINISH_REASON_ABORTED,
    spb.FINISH_REASON_ABORTED: pb.FINISH_REASON_ABORTED,
}


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
    def __init__(self, model: ModelTokenizer, link: SchedulerLink, default_max_tokens: int):
        self._model = model
        self._link = link
        self._default_max_tokens = default_max_tokens

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
            raise InvalidArgumentError("model", f"unknown model {request.model!r}")
        sampling = check_sampling(
            max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
            temperature=request.temperature if request.HasField("temperature") else None,
            top_p=request.top_p if request.HasField("top_p") else None,
            top_k=request.top_k if request.HasField("top_k") else None,
            seed=request.seed if request.HasField("seed") else None,
            stop=list(request.stop),
            ignore_eos=request.ignore_eos,
        )
        kind = request.WhichOneof("input")
        if kind == "prompt":
            if not request.prompt:
                raise InvalidArgumentError("prompt", "must not be empty")
            prompt_ids = self._model.encode_prompt(request.prompt)
        elif kind == "chat":
            messages = request.chat.messages
            if not messages:
                raise InvalidArgumentError("chat.messages", "must not be empty")
            for i, m in enumerate(messages):
                if not m.role:
                    raise InvalidArgumentError(f"chat.messages[{i}].role", "must not be empty")
            prompt_ids = self._model.encode_chat([ChatTurn(m.role, m.content) for m in messages])
        else:
            raise InvalidArgumentError("prompt", "one of prompt or chat is required")
        if not prompt_ids:
            raise InvalidArgumentError("prompt", "tokenizes to no tokens")
        return prompt_ids, sampling

    async def Generate(self, request, context) -> AsyncIterator[pb.GenerateResponse]:
        if isinstance(request, Undecodable):
            _raise_undecodable(request)
        prompt_ids, sampling = self._prepare(request)
        max_tokens = resolve_max_tokens(
            sampling.max_tokens,
            len(prompt_ids),
            self._model.max_model_len,
            self._default_max_tokens,
        )
        job_id = uuid.uuid4().hex
        submit = spb.Submit(
            job_id=job_id,
            prompt_token_ids=prompt_ids,
            max_tokens=max_tokens,
            stop_token_ids=sorted(self._model.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
            sampling=spb.SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                seed=sampling.seed or 0,
                has_seed=sampling.seed is not None,
            ),
        )
        try:
            events = self._link.submit(submit)
        except LinkLost as exc:
            raise UnavailableError(str(exc)) from exc
        detokenizer = IncrementalDetokenizer(self._model.tokenizer, prompt_ids)
        stops = StopStringMatcher(sampling.stop)
        num_generated = 0
        done = False
        try:
            while not done:
                batch = await events.get()
                if isinstance(batch, LinkLost):
                    raise UnavailableError(f"{batch}; retry the request")
                response = pb.GenerateResponse(request_id=job_id)
                for event in batch:
                    if event.kind == spb.EVENT_KIND_REJECTED:
                        field, _, problem = event.error.partition(": ")
                        raise InvalidArgumentError(field, problem)
                    state = _STATE.get(event.kind)
                    if state is not None:
                        yield pb.GenerateResponse(
                            request_id=job_id, state=state, queue_level=event.queue_level
                        )
                        continue
                    num_generated += len(event.token_ids)
                    response.token_ids.extend(event.token_ids)
                    finished = event.kind == spb.EVENT_KIND_FINISHED
                    text = detokenizer.add(event.token_ids)
                    if finished:
                        text += detokenizer.flush()
                    response.text += stops.feed(text, final=finished)
                    if stops.stopped:
                        self._link.cancel(job_id)
                        response.finish_reason = pb.FINISH_REASON_STOP
                    elif finished:
                        self._link.forget(job_id)
                        response.finish_reason = _FINISH[event.finish_reason]
                    if response.finish_reason:
                        response.usage.prompt_tokens = len(prompt_ids)
                        response.usage.completion_tokens = num_generated
                        done = True
                        break
                if response.text or response.token_ids or response.finish_reason:
                    yield response
        finally:
            if not done:  # the client went away or an error ended the stream
                self._link.cancel(job_id)


_STATE = {
    spb.EVENT_KIND_QUEUED: pb.JOB_STATE_QUEUED,
    spb.EVENT_KIND_PREEMPTED: pb.JOB_STATE_PREEMPTED,
    spb.EVENT_KIND_RESUMED: pb.JOB_STATE_RUNNING,
}
