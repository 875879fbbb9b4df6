"""`fastserve frontend`: the public gRPC gateway."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from services.common.flags import add_flag
from services.common.grpc_server import bind, build_aio_server, set_health
from services.common.lifecycle import announce_ready
from services.common.logs import LOG_LEVELS, setup_logging
from services.common.model_source import DEFAULT_MODEL, resolve_model
from services.frontend.scheduler_link import SchedulerLink
from services.frontend.server import SERVICE_NAME, GenerationServicer
from services.frontend.tokenizer import ModelTokenizer

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--host", default="127.0.0.1", help="interface to listen on")
    add_flag(parser, "--port", type=int, default=50051, help="public gRPC port (0: pick one)")
    add_flag(parser, "--scheduler-address", default="127.0.0.1:50052", help="the scheduler")
    add_flag(parser, "--model", default=DEFAULT_MODEL, help="model name, HF folder or .gguf")
    add_flag(
        parser,
        "--default-max-tokens",
        type=int,
        default=1024,
        help="output cap when a request sets no max_tokens",
    )
    add_flag(parser, "--log-level", default="info", choices=LOG_LEVELS, help="log verbosity")


def run(args: argparse.Namespace) -> int:
    setup_logging("frontend", args.log_level)
    model = ModelTokenizer.load(resolve_model(args.model))
    return asyncio.run(_serve(args, model))


async def _serve(args: argparse.Namespace, model: ModelTokenizer) -> int:
    server, health = build_aio_server([SERVICE_NAME])

    pending: set[asyncio.Task] = set()

    def on_scheduler_state(connected: bool) -> None:
        task = asyncio.ensure_future(set_health(health, [SERVICE_NAME], serving=connected))
        pending.add(task)
        task.add_done_callback(pending.discard)

    link = SchedulerLink(args.scheduler_address, on_state=on_scheduler_state)
    servicer = GenerationServicer(model, link, args.default_max_tokens)
    server.add_generic_rpc_handlers([servicer.handlers()])
    port = bind(server, f"{args.host}:{args.port}")
    await set_health(health, [SERVICE_NAME], serving=False)
    await server.start()
    link.start()
    await link.connected.wait()
    announce_ready("frontend", f"{args.host}:{port}")

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("frontend: stopping")
    await set_health(health, [SERVICE_NAME], serving=False)
    await server.stop(grace=2)
    await link.close()
    return 0
