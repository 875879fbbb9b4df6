"""`fastserve frontend`: the public gRPC gateway, and OpenAI-compatible HTTP beside it.

On SIGTERM it drains before it stops: /ready and gRPC health turn to not serving (so the
load balancer stops sending), new requests get 503 with Retry-After / UNAVAILABLE, and the
requests in flight run to their end for up to --drain-timeout seconds; then it stops, exit code
0. A second SIGTERM or SIGINT ends the wait at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.flags import add_flag
from services.common.grpc_server import (
    AioErrorInterceptor,
    add_reuse_port_flag,
    bind,
    server_options,
    set_health,
)
from services.common.lifecycle import announce_ready
from services.common.logs import LOG_LEVELS, setup_logging
from services.common.model_source import DEFAULT_MODEL, resolve_model
from services.frontend import auth, priority
from services.frontend.auth import ApiKeys, AuthInterceptor
from services.frontend.generation import (
    DEFAULT_MAX_PROMPT_CHARS,
    DEFAULT_MAX_QUEUED_REQUESTS,
    GenerationCore,
    Limits,
)
from services.frontend.metrics import FrontendMetrics
from services.frontend.openai_http import OpenAIServer
from services.frontend.priority import PriorityRules
from services.frontend.scheduler_link import SchedulerLink
from services.frontend.server import SERVICE_NAME, GenerationServicer
from services.frontend.tokenizer import ModelTokenizer

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--host", default="127.0.0.1", help="interface to listen on")
    add_flag(parser, "--port", type=int, default=50051, help="public gRPC port (0: pick one)")
    add_reuse_port_flag(parser)
    add_flag(parser, "--scheduler-address", default="127.0.0.1:50052", help="the scheduler")
    add_flag(parser, "--model", default=DEFAULT_MODEL, help="model name, HF folder or .gguf")
    add_flag(
        parser,
        "--default-max-tokens",
        type=int,
        default=1024,
        help="output cap when a request sets no max_tokens",
    )
    add_flag(
        parser,
        "--http-port",
        type=int,
        default=8000,
        help="OpenAI-compatible HTTP port (0: pick one, -1: no HTTP)",
    )
    add_flag(
        parser, "--max-body-bytes", type=int, default=1 << 20, help="largest HTTP request body"
    )
    add_flag(
        parser,
        "--max-prompt-chars",
        type=int,
        default=DEFAULT_MAX_PROMPT_CHARS,
        help="longest prompt, in characters, checked before tokenizing",
    )
    add_flag(
        parser,
        "--max-queued-requests",
        type=int,
        default=DEFAULT_MAX_QUEUED_REQUESTS,
        help="requests in flight before new ones get RESOURCE_EXHAUSTED / HTTP 429 (0: no bound)",
    )
    add_flag(
        parser,
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help="on SIGTERM, seconds the requests in flight may take to finish before the frontend "
        "stops (new ones are refused meanwhile)",
    )
    auth.add_arguments(parser)
    priority.add_arguments(parser)
    add_flag(parser, "--log-level", default="info", choices=LOG_LEVELS, help="log verbosity")


def run(args: argparse.Namespace) -> int:
    setup_logging("frontend", args.log_level)
    try:  # settings that make no sense stop it before anything loads
        GenerationCore.check_settings(PriorityRules.from_args(args), ApiKeys.from_args(args))
    except ValueError as exc:
        log.error("frontend: %s", exc)
        return 2
    model = ModelTokenizer.load(resolve_model(args.model))
    return asyncio.run(_serve(args, model))


def _build_grpc_server(
    keys: ApiKeys, *, reuse_port: bool
) -> tuple[grpc.aio.Server, grpc_health.aio.HealthServicer]:
    """Like build_aio_server, with the API-key check ahead of the error interceptor."""
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(keys), AioErrorInterceptor()],
        options=server_options(reuse_port=reuse_port),
    )
    health = grpc_health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [SERVICE_NAME, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return server, health


@dataclass
class Frontend:
    """A started frontend: gRPC and (unless --http-port -1) HTTP serve, and the scheduler link
    connects in the background. `_serve` runs one until a stop signal; tests start one directly."""

    grpc_port: int
    http_port: int | None  # None: no HTTP
    link: SchedulerLink
    core: GenerationCore
    _server: grpc.aio.Server
    _health: grpc_health.aio.HealthServicer
    _http: OpenAIServer | None
    _metrics: FrontendMetrics

    @classmethod
    async def start(cls, args: argparse.Namespace, model: ModelTokenizer) -> Frontend:
        keys = ApiKeys.from_args(args)
        server, health = _build_grpc_server(keys, reuse_port=args.reuse_port)
        pending: set[asyncio.Task] = set()

        def on_scheduler_state(connected: bool) -> None:
            # A scheduler that comes back while this frontend drains must not make it serving.
            serving = connected and not core.draining
            task = asyncio.ensure_future(set_health(health, [SERVICE_NAME], serving=serving))
            pending.add(task)
            task.add_done_callback(pending.discard)

        link = SchedulerLink(args.scheduler_address, on_state=on_scheduler_state)
        metrics = FrontendMetrics(args.scheduler_address)
        limits = Limits(
            max_prompt_chars=args.max_prompt_chars, max_queued_requests=args.max_queued_requests
        )
        core = GenerationCore(
            model,
            link,
            args.default_max_tokens,
            limits,
            metrics,
            priorities=PriorityRules.from_args(args),
            keys=keys,
        )
        server.add_generic_rpc_handlers([GenerationServicer(core).handlers()])
        grpc_port = bind(server, f"{args.host}:{args.port}")
        await set_health(health, [SERVICE_NAME], serving=False)
        await server.start()
        http, http_port = None, None
        if args.http_port >= 0:
            http = OpenAIServer(
                core,
                keys,
                metrics,
                max_body_bytes=args.max_body_bytes,
                is_ready=link.connected.is_set,
            )
            http_port = await http.start(args.host, args.http_port, reuse_port=args.reuse_port)
            log.info("frontend: OpenAI-compatible HTTP on http://%s:%d", args.host, http_port)
        if keys.enabled:
            log.info("frontend: API keys required")
        link.start()
        return cls(grpc_port, http_port, link, core, server, health, http, metrics)

    async def drain(self, timeout_s: float, interrupt: asyncio.Event | None = None) -> int:
        """Stops taking requests (health and /ready: not serving; new requests: UNAVAILABLE /
        503) and waits until those in flight end, `timeout_s` passes or `interrupt` is set.
        Returns how many were still in flight."""
        self.core.start_draining()
        await set_health(self._health, [SERVICE_NAME], serving=False)
        waits = [asyncio.ensure_future(self.core.wait_idle())]
        if interrupt is not None:
            waits.append(asyncio.ensure_future(interrupt.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self.core.num_in_flight

    async def stop(self) -> None:
        await set_health(self._health, [SERVICE_NAME], serving=False)
        if self._http is not None:
            await self._http.stop()
        await self._server.stop(grace=2)
        await self.link.close()
        await self._metrics.close()


async def _serve(args: argparse.Namespace, model: ModelTokenizer) -> int:
    frontend = await Frontend.start(args, model)
    await frontend.link.connected.wait()
    # Handlers before the ready line: a launcher may stop us the moment it reads it.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    announce_ready("frontend", f"{args.host}:{frontend.grpc_port}")
    await stopping.wait()
    stopping.clear()  # a second signal cuts the drain short
    log.info(
        "frontend: draining %d requests in flight (up to %gs)",
        frontend.core.num_in_flight,
        args.drain_timeout,
    )
    left = await frontend.drain(args.drain_timeout, interrupt=stopping)
    if left:
        log.warning("frontend: stopping with %d requests still in flight", left)
    log.info("frontend: stopping")
    await frontend.stop()
    return 0
