"""gRPC server construction shared by every service: one error interceptor, health, reflection.

Handlers raise `ServiceError` subclasses (services.common.errors); the interceptor turns them into
status codes, and any other exception into INTERNAL without killing the process.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import ServiceError

log = logging.getLogger(__name__)

# Large enough for a block group chunk (4 MiB) plus framing.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]
# Channels between our services. Peers start side by side and a channel opened before its
# server listens retries on gRPC's default backoff (1 s, growing 1.6x per try to 120 s), so a
# worker that takes 10 s to load would be noticed up to 10 s late. Retry every 0.1 s, at most
# 1 s apart: the peers are a handful of processes, not a fleet.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
CHANNEL_OPTIONS = [*GRPC_OPTIONS, *RECONNECT_OPTIONS]


def server_options(*, reuse_port: bool = False) -> list[tuple[str, int]]:
    """Channel options for a server. A busy port is an error (SO_REUSEPORT off) unless
    `reuse_port`: then the server joins a port that its launcher reserved and still holds, so no
    other process can take the port between the launcher's pick and the child's bind."""
    return [*GRPC_OPTIONS[:-1], ("grpc.so_reuseport", int(reuse_port))]


def add_reuse_port_flag(parser) -> None:
    from services.common.flags import add_flag

    add_flag(
        parser,
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT, joining a port reserved by `fastserve up`",
    )


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    log.exception("unhandled error in handler", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by sync handlers to gRPC status codes."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream))
        return handler


def _wrap_unary(fn):
    def wrapped(request, context):
        try:
            return fn(request, context)
        except grpc.RpcError:
            return None  # the caller went away (or abort() ran): nothing left to tell it
        except Exception as exc:
            context.abort(*_status_of(exc))

    return wrapped


def _wrap_stream(fn):
    def wrapped(request, context):
        try:
            yield from fn(request, context)
        except grpc.RpcError:
            return  # the caller went away (or abort() ran): nothing left to tell it
        except Exception as exc:
            context.abort(*_status_of(exc))

    return wrapped


class AioErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by asyncio handlers to gRPC status codes."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_aio_unary(handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_aio_stream(handler.unary_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_aio_unary(handler.stream_unary))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_aio_stream(handler.stream_stream))
        return handler


def _wrap_aio_unary(fn):
    async def wrapped(request, context):
        try:
            return await fn(request, context)
        except (grpc.aio.AbortError, KeyboardInterrupt):
            raise
        except Exception as exc:
            await context.abort(*_status_of(exc))

    return wrapped


def _wrap_aio_stream(fn):
    async def wrapped(request, context):
        try:
            result = fn(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:
                await result
        except (grpc.aio.AbortError, KeyboardInterrupt):
            raise
        except Exception as exc:
            await context.abort(*_status_of(exc))

    return wrapped


def _full_names(service_names: Iterable[str]) -> list[str]:
    return [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]


def build_server(
    service_names: Sequence[str], *, max_workers: int = 32, reuse_port: bool = False
) -> tuple[grpc.Server, health.HealthServicer]:
    """A sync server with the error interceptor, health (NOT_SERVING until `mark_serving`) and
    reflection. Add servicers, bind, start, then call `mark_serving`."""
    from concurrent import futures

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[ErrorInterceptor()],
        options=server_options(reuse_port=reuse_port),
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(_full_names(service_names), server)
    set_health(health_servicer, service_names, serving=False)
    return server, health_servicer


def build_aio_server(
    service_names: Sequence[str], *, reuse_port: bool = False
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The asyncio twin of `build_server`."""
    server = grpc.aio.server(
        interceptors=[AioErrorInterceptor()], options=server_options(reuse_port=reuse_port)
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(_full_names(service_names), server)
    return server, health_servicer


def set_health(servicer, service_names: Sequence[str], *, serving: bool):
    """Sets overall ("") and per-service health. Returns an awaitable for the aio servicer."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    results = [servicer.set(name, status) for name in ["", *service_names]]
    if results and inspect.isawaitable(results[0]):

        async def _all():
            for r in results:
                await r

        return _all()
    return None


def bind(server, address: str) -> int:
    """Binds an insecure port; returns the port (useful with port 0)."""
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return port
