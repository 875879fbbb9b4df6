"""OpenAI-compatible HTTP on the frontend (aiohttp, in the frontend's asyncio loop).

Routes: POST /v1/completions and /v1/chat/completions (server-sent events when `stream`, ending
in `data: [DONE]`), GET /v1/models; GET /health (the process is alive), /ready (tokenizer loaded,
the scheduler connected and not draining) and /metrics (Prometheus), which need no API key.
Requests go through the same `GenerationCore` as gRPC `Generate`. Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`; 429 and 503 carry Retry-After, 401
WWW-Authenticate.

A client that disconnects cancels its handler (aiohttp `handler_cancellation`), which closes the
generation and cancels the job at the scheduler; a write that finds the connection already gone
does the same. Either way it is a client disconnect, counted as status 499 (nginx's "client
closed request"), not a server error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

from aiohttp import web

from services.common.errors import (
    InvalidArgumentError,
    ResourceExhaustedError,
    ServiceError,
    UnavailableError,
)
from services.frontend.auth import ApiKeys
from services.frontend.generation import (
    RETRY_AFTER_S,
    Delta,
    GenerationCore,
    PreparedRequest,
    TokenLogprob,
)
from services.frontend.metrics import CONTENT_TYPE, FrontendMetrics
from services.frontend.openai_schema import (
    ApiError,
    OpenAIRequest,
    parse_chat,
    parse_completion,
    parse_json,
)
from services.frontend.priority import Granted
from services.frontend.validation import echo

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
RETRY_HEADERS = {"Retry-After": str(RETRY_AFTER_S)}
PRIORITY_HEADER = "X-FastServe-Priority"
PRIORITY_CAPPED_HEADER = "X-FastServe-Priority-Capped"
CLIENT_CLOSED_STATUS = "499"  # the metrics' status of a request whose client went away


def error_of(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidArgumentError):
        return ApiError(400, exc.message, param=exc.field)
    if isinstance(exc, ResourceExhaustedError):
        return ApiError(
            429,
            exc.message,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers=RETRY_HEADERS,
        )
    if isinstance(exc, UnavailableError):
        return ApiError(
            503, exc.message, type="server_error", code="unavailable", headers=RETRY_HEADERS
        )
    if isinstance(exc, ServiceError):
        return ApiError(500, exc.message, type="server_error")
    log.exception("unhandled error in an HTTP handler", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")


def _error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


class OpenAIServer:
    def __init__(
        self,
        core: GenerationCore,
        keys: ApiKeys,
        metrics: FrontendMetrics,
        *,
        max_body_bytes: int,
        is_ready: Callable[[], bool],
    ) -> None:
        self.core = core
        self.keys = keys
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.is_ready = is_ready
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.max_body_bytes, middlewares=[self._errors, self._auth]
        )
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Serves on host:port (0 picks one); returns the bound port. `reuse_port` joins a port
        that the launcher reserved (see `server_options`)."""
        self._runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=2.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        server = site._server
        return server.sockets[0].getsockname()[1] if server and server.sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unknown"
        try:
            response = await handler(request)
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            # The client went away: aiohttp cancelled the handler, or a write found the
            # connection closed (it hung up just as its stream started). The generation was
            # closed on the way out, which cancelled the job; nothing is left to answer.
            log.debug("client disconnected: %s %s", request.method, request.path)
            self.metrics.http_responses.labels(name, CLIENT_CLOSED_STATUS).inc()
            if isinstance(exc, asyncio.CancelledError):
                raise
            # aiohttp's attempt to send this finds the connection gone and drops it quietly.
            return web.Response(status=499)
        except web.HTTPRequestEntityTooLarge:
            response = _error_response(
                ApiError(
                    413,
                    f"request body larger than {self.max_body_bytes} bytes",
                    code="request_too_large",
                )
            )
        except web.HTTPException as exc:
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            message = f"{request.method} {request.path}: {exc.reason}"
            response = _error_response(ApiError(exc.status, message, type=kind))
        except Exception as exc:
            response = _error_response(error_of(exc))
        if self.core.draining:
            response.force_close()  # no keep-alive: the client's next request goes elsewhere
        self.metrics.http_responses.labels(name, str(response.status)).inc()
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS and not self.keys.allows(
            request.headers.get("Authorization")
        ):
            raise ApiError(
                401,
                "missing or invalid API key (send Authorization: Bearer <key>)",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    # -- probes and listings

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _ready(self, request: web.Request) -> web.Response:
        if self.core.draining:
            return web.json_response({"status": "not ready: draining"}, status=503)
        if self.is_ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready: scheduler not connected"}, status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self.metrics.render(self.core.num_in_flight)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _models(self, request: web.Request) -> web.Response:
        model = self.core.model
        card = {
            "id": model.name,
            "object": "model",
            "created": 0,
            "owned_by": "fastserve",
            "max_model_len": model.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    # -- generation

    async def _read(self, request: web.Request) -> dict[str, Any]:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.max_body_bytes, actual_size=request.content_length
            )
        return parse_json(await request.read())

    def _prepare(self, request: web.Request, parsed: OpenAIRequest) -> PreparedRequest:
        model = self.core.model
        if parsed.model is not None and not model.source.matches(parsed.model):
            raise ApiError(
                404,
                f"model {echo(parsed.model)} does not exist; this server serves {model.name!r}",
                param="model",
                code="model_not_found",
            )
        if parsed.messages is not None:
            num_chars = sum(len(t.content) + len(t.role) for t in parsed.messages)
            self.core.check_prompt_chars("messages", num_chars)
            prompt_ids = model.encode_chat(parsed.messages)
        elif parsed.prompt_ids is not None:
            vocab = len(model.tokenizer)
            for i, token_id in enumerate(parsed.prompt_ids):
                if token_id >= vocab:
                    raise InvalidArgumentError(f"prompt[{i}]", f"token id must be < {vocab}")
            prompt_ids = parsed.prompt_ids
        else:
            assert parsed.prompt is not None
            self.core.check_prompt_chars("prompt", len(parsed.prompt))
            prompt_ids = model.encode_prompt(parsed.prompt)
        priority = self.core.grant_priority(parsed.priority, request.headers.get("Authorization"))
        return self.core.prepare(prompt_ids, parsed.sampling, priority)

    def _token_text(self, token_id: int) -> str:
        return self.core.model.tokenizer.decode([token_id])

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_completion(await self._read(request))
        return await self._run(
            request, parsed, _CompletionFormat(self.core.model.name, parsed, self._token_text)
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_chat(await self._read(request))
        return await self._run(
            request, parsed, _ChatFormat(self.core.model.name, parsed, self._token_text)
        )

    async def _run(self, request: web.Request, parsed: OpenAIRequest, fmt) -> web.StreamResponse:
        prepared = self._prepare(request, parsed)
        headers = _priority_headers(prepared.priority)
        async with aclosing(self.core.generate(prepared)) as deltas:
            # The first delta is awaited before any header goes out, so a full queue or a lost
            # scheduler still gets its own status code.
            first = await anext(deltas, None)
            if not parsed.stream:
                text, logprobs, last = [], [], first
                if first is not None:
                    text.append(first.text)
                    logprobs.extend(first.logprobs)
                async for delta in deltas:
                    text.append(delta.text)
                    logprobs.extend(delta.logprobs)
                    last = delta
                return web.json_response(fmt.full("".join(text), last, logprobs), headers=headers)
            response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
            await response.prepare(request)
            await self._stream(response, first, deltas, parsed, fmt)
            return response

    async def _stream(self, response, first, deltas, parsed: OpenAIRequest, fmt) -> None:
        try:
            if fmt.opening is not None:
                await response.write(_sse(fmt.chunk(fmt.opening, None, parsed.include_usage)))
            last = None
            delta = first
            while delta is not None:
                # One chunk per token delta (the core merges only tokens whose text it held
                # back), even one with no text (a skipped special token); state deltas have none.
                if delta.state is None:
                    chunk = fmt.chunk(
                        delta.text, delta.finish_reason, parsed.include_usage, delta.logprobs
                    )
                    await response.write(_sse(chunk))
                last = delta
                delta = await anext(deltas, None)
            if parsed.include_usage and last is not None:
                await response.write(_sse(fmt.usage_chunk(last)))
            await response.write(b"data: [DONE]\n\n")
        except ServiceError as exc:
            await response.write(_sse(error_of(exc).body()))
        await response.write_eof()


def _priority_headers(granted: Granted) -> dict[str, str]:
    """The class a request runs in; and, if it asked for a higher one than its API key may
    use, that it was capped."""
    headers = {PRIORITY_HEADER: str(granted.priority)}
    if granted.capped:
        headers[PRIORITY_CAPPED_HEADER] = "true"
    return headers


def _usage(delta: Delta | None) -> dict[str, Any]:
    prompt = delta.num_prompt_tokens if delta else 0
    completion = delta.num_completion_tokens if delta else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": delta.num_cached_tokens if delta else 0},
    }


def _finish(reason: str | None) -> str | None:
    return "abort" if reason == "aborted" else reason


class _CompletionFormat:
    """OpenAI's text_completion objects; logprobs in the legacy completions layout."""

    opening = None  # no first chunk of its own

    def __init__(self, model: str, parsed: OpenAIRequest, token_text: Callable[[int], str]) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.want_logprobs = parsed.sampling.params.logprobs
        self.token_text = token_text  # a token id as text, for logprobs
        self._text_offset = 0

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def logprobs(self, items: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        tokens = [self.token_text(lp.token_id) for lp in items]
        offsets = []
        for token in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [
                {self.token_text(t): v for t, v in lp.top} if lp.top else None for lp in items
            ],
            "text_offset": offsets,
        }

    def full(self, text: str, last: Delta | None, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        reason = _finish(last.finish_reason if last else None)
        choice = {
            "index": 0,
            "text": text,
            "logprobs": self.logprobs(logprobs),
            "finish_reason": reason,
        }
        return {**self._base("text_completion"), "choices": [choice], "usage": _usage(last)}

    def chunk(
        self,
        text: str,
        reason: str | None,
        include_usage: bool,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": self.logprobs(logprobs or []),
            "finish_reason": _finish(reason),
        }
        chunk = {**self._base("text_completion"), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, last: Delta) -> dict[str, Any]:
        return {**self._base("text_completion"), "choices": [], "usage": _usage(last)}


class _ChatFormat(_CompletionFormat):
    """OpenAI's chat.completion objects; logprobs as `{"content": [...]}`."""

    opening = ""  # the first chunk carries the role

    def __init__(self, model: str, parsed: OpenAIRequest, token_text: Callable[[int], str]) -> None:
        super().__init__(model, parsed, token_text)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self._sent_role = False

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self.token_text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    def logprobs(self, items: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return {
            "content": [
                {
                    **self._entry(lp.token_id, lp.logprob),
                    "top_logprobs": [self._entry(t, v) for t, v in lp.top],
                }
                for lp in items
            ]
        }

    def full(self, text: str, last: Delta | None, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": self.logprobs(logprobs),
            "finish_reason": _finish(last.finish_reason if last else None),
        }
        return {**self._base("chat.completion"), "choices": [choice], "usage": _usage(last)}

    def chunk(
        self,
        text: str,
        reason: str | None,
        include_usage: bool,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if not self._sent_role:
            delta["role"] = "assistant"
            self._sent_role = True
        if text or not reason:
            delta["content"] = text
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": self.logprobs(logprobs or []) if logprobs else None,
            "finish_reason": _finish(reason),
        }
        chunk = {**self._base("chat.completion.chunk"), "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, last: Delta) -> dict[str, Any]:
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": _usage(last)}
