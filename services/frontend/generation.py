"""The generation core both public surfaces share (gRPC `Generate` and the OpenAI HTTP routes).

A surface turns its wire request into token ids and a `SamplingRequest`; `prepare` applies the
context and prompt limits, and `generate` submits the job to the scheduler and yields `Delta`s:
one per generated token (its id, logprob and text; a token whose text is held back, an incomplete
character or a possible stop-string prefix, goes out with the next token's delta instead), job
state changes, and a last delta with the last token, the finish reason and usage. Closing the
generator early (a client that went away) cancels the job, so its KV blocks are freed at the
scheduler's next iteration.

Draining (`start_draining`, on SIGTERM): requests in flight go on; new ones are refused as
unavailable, so the client retries on another frontend; `wait_idle` returns when none is left.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastserve.scheduler.v1 import scheduler_pb2 as spb
from services.common.errors import (
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from services.common.sampling_pb import sampling_to_pb
from services.frontend.auth import ApiKeys
from services.frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.frontend.priority import DEFAULT_GRANT, Granted, PriorityRules
from services.frontend.scheduler_link import LinkLost, SchedulerLink
from services.frontend.tokenizer import ModelTokenizer
from services.frontend.validation import SamplingRequest, resolve_max_tokens

FINISH_REASONS = {
    spb.FINISH_REASON_STOP: "stop",
    spb.FINISH_REASON_LENGTH: "length",
    spb.FINISH_REASON_CANCELLED: "aborted",
    spb.FINISH_REASON_ABORTED: "aborted",
}
STATES = {
    spb.EVENT_KIND_QUEUED: "queued",
    spb.EVENT_KIND_PREEMPTED: "preempted",
    spb.EVENT_KIND_RESUMED: "running",
}


DEFAULT_MAX_PROMPT_CHARS = 1 << 20
DEFAULT_MAX_QUEUED_REQUESTS = 256
# Seconds a refused client (queue full, draining, scheduler gone) is told to wait before it
# retries: HTTP Retry-After, gRPC `retry-after` trailing metadata.
RETRY_AFTER_S = 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request and server-wide bounds on what a client may ask for."""

    # Checked before tokenizing, so a giant prompt costs little.
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    # Requests in flight (waiting or running); 0 = no bound.
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request ready to submit: token ids and settled sampling."""

    prompt_ids: list[int]
    sampling: SamplingRequest
    max_tokens: int  # the resolved output budget
    priority: Granted = DEFAULT_GRANT  # the class it runs in (services/frontend/priority.py)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass(slots=True)
class Delta:
    """One step of a generation as a surface sees it: a state change, or one generated token
    (with any earlier tokens whose text was held back until this one), or the last step."""

    job_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    state: str | None = None  # "queued", "preempted" or "running" when the job's state changed
    queue_level: int = 0
    finish_reason: str | None = None  # "stop", "length" or "aborted" on the last delta
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # of num_prompt_tokens, found in the prefix cache
    num_completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per token, when asked
    priority: Granted = DEFAULT_GRANT  # on the last delta: the class it ran in


class GenerationCore:
    def __init__(
        self,
        model: ModelTokenizer,
        link: SchedulerLink,
        default_max_tokens: int,
        limits: Limits | None = None,
        metrics=None,  # services.frontend.metrics.FrontendMetrics, or None
        priorities: PriorityRules | None = None,
        keys: ApiKeys | None = None,
    ) -> None:
        self.model = model
        self.priorities = priorities or PriorityRules()
        self.keys = keys or ApiKeys([])
        self.check_settings(self.priorities, self.keys)
        self.link = link
        self.default_max_tokens = default_max_tokens
        self.limits = limits or Limits()
        self.metrics = metrics
        self.num_in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()  # set while num_in_flight is 0
        self._idle.set()

    def start_draining(self) -> None:
        """Refuses new requests from now on; those in flight go on."""
        self.draining = True

    async def wait_idle(self) -> None:
        """Returns once no request is in flight."""
        await self._idle.wait()

    def check_prompt_chars(self, name: str, num_chars: int) -> None:
        if num_chars > self.limits.max_prompt_chars:
            raise InvalidArgumentError(
                name, f"{num_chars} characters exceed the limit of {self.limits.max_prompt_chars}"
            )

    @staticmethod
    def check_settings(priorities: PriorityRules, keys: ApiKeys) -> None:
        """Raises ValueError when an API key names a class the deployment does not have."""
        for top in keys.tops:
            if top is not None:
                priorities.check_class("an API key's top-priority", top)

    def grant_priority(self, asked: int | None, authorization: str | None) -> Granted:
        """The class of a request that asked for `asked`, from a caller that sent
        `authorization` (its API key decides the highest class it may use)."""
        return self.priorities.grant(asked, self.keys.top_priority(authorization))

    def prepare(
        self, prompt_ids: list[int], sampling: SamplingRequest, priority: Granted = DEFAULT_GRANT
    ) -> PreparedRequest:
        if not prompt_ids:
            raise InvalidArgumentError("prompt", "tokenizes to no tokens")
        max_tokens = resolve_max_tokens(
            sampling.max_tokens, len(prompt_ids), self.model.max_model_len, self.default_max_tokens
        )
        return PreparedRequest(prompt_ids, sampling, max_tokens, priority)

    def can_admit(self) -> bool:
        bound = self.limits.max_queued_requests
        return bound <= 0 or self.num_in_flight < bound

    async def generate(self, request: PreparedRequest) -> AsyncIterator[Delta]:
        """Runs one job; raises ServiceError subclasses (queue full, draining, scheduler gone,
        rejected)."""
        if self.draining:
            raise UnavailableError("this frontend is shutting down; retry the request")
        if not self.can_admit():
            raise ResourceExhaustedError(
                f"{self.num_in_flight} requests in flight, the limit; retry later"
            )
        job_id = uuid.uuid4().hex
        sampling = request.sampling
        submit = spb.Submit(
            job_id=job_id,
            prompt_token_ids=request.prompt_ids,
            max_tokens=request.max_tokens,
            stop_token_ids=sorted(self.model.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
            sampling=sampling_to_pb(sampling.params),
            priority=request.priority.priority,
        )
        try:
            events = self.link.submit(submit)
        except LinkLost as exc:
            raise UnavailableError(str(exc)) from exc
        self.num_in_flight += 1
        self._idle.clear()
        timer = _Timer()
        detokenizer = IncrementalDetokenizer(self.model.tokenizer, request.prompt_ids)
        stops = StopStringMatcher(sampling.stop)
        num_generated = 0
        num_cached = 0
        finish_reason = "error"
        # The delta being built: the current token, plus any earlier ones whose text was held.
        delta = Delta(job_id)
        try:
            while True:
                # One batch per scheduler iteration (the link never merges iterations).
                batch = await events.get()
                if isinstance(batch, LinkLost):
                    raise UnavailableError(f"{batch}; retry the request")
                for event in batch:
                    if event.kind == spb.EVENT_KIND_REJECTED:
                        if event.retry:  # the scheduler is shutting down
                            raise UnavailableError(event.error)
                        name, _, problem = event.error.partition(": ")
                        raise InvalidArgumentError(name, problem)
                    state = STATES.get(event.kind)
                    if state is not None:
                        yield Delta(job_id, state=state, queue_level=event.queue_level)
                        continue
                    if event.token_ids and num_generated == 0:
                        timer.first_token()
                    num_cached = max(num_cached, event.num_cached_tokens)
                    finished = event.kind == spb.EVENT_KIND_FINISHED
                    last = len(event.token_ids) - 1
                    # One delta per token, even if an event carries several, so that clients
                    # see each token's time (one SSE chunk, one GenerateResponse per token).
                    for i, token in enumerate(event.token_ids):
                        num_generated += 1
                        delta.token_ids.append(token)
                        if i < len(event.logprobs):
                            lp = event.logprobs[i]
                            top = [(t.token_id, t.logprob) for t in lp.top]
                            delta.logprobs.append(TokenLogprob(token, lp.logprob, top))
                        text = detokenizer.add((token,))
                        delta.text += stops.feed(text)
                        if stops.stopped or (finished and i == last):
                            break  # this token goes out with the finish reason, below
                        if not delta.text and (detokenizer.holding or text):
                            # The only merge: the token's text is held back (the bytes of an
                            # incomplete character, or a tail that may begin a stop string),
                            # so it gets no delta of its own; its id, logprob and text go out
                            # with the next token's delta. A token with no text at all (a
                            # skipped special token) still gets its own, empty, delta.
                            continue
                        yield delta
                        delta = Delta(job_id)
                    if finished and not stops.stopped:
                        delta.text += stops.feed(detokenizer.flush(), final=True)
                    if stops.stopped:
                        self.link.cancel(job_id)
                        delta.finish_reason = "stop"
                    elif finished:
                        self.link.forget(job_id)
                        delta.finish_reason = FINISH_REASONS.get(event.finish_reason, "aborted")
                    if delta.finish_reason:
                        finish_reason = delta.finish_reason
                        delta.num_prompt_tokens = len(request.prompt_ids)
                        delta.num_cached_tokens = num_cached
                        delta.num_completion_tokens = num_generated
                        delta.priority = request.priority
                        yield delta
                        return
        except (GeneratorExit, asyncio.CancelledError):
            finish_reason = "cancelled"
            raise
        finally:
            self.num_in_flight -= 1
            if self.num_in_flight == 0:
                self._idle.set()
            if finish_reason in ("error", "cancelled"):  # the client went away, or an error
                self.link.cancel(job_id)
            if self.metrics is not None:
                self.metrics.observe_request(finish_reason, timer, num_generated, request.priority)


class _Timer:
    """Wall times of one request, for the latency histograms."""

    __slots__ = ("first_token_s", "start_s")

    def __init__(self) -> None:
        self.start_s = time.monotonic()
        self.first_token_s: float | None = None

    def first_token(self) -> None:
        self.first_token_s = time.monotonic()
