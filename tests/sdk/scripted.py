"""A scripted Generation double for the SDK tests, on an in-process gRPC server.

The double records every request and its metadata, and plays one script per call: responses to
send, an `Abort` to fail with, or `HOLD` to wait until the client goes away (and note that it
did). The real frontend is tested end to end elsewhere; here we test the client's behaviour.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from fastserve.v1 import generation_pb2 as pb
from fastserve.v1 import generation_pb2_grpc as pb_grpc
from fastserve_client import (
    AsyncClient,
    Client,
)

HOLD = "hold"
HOLD_LIMIT_S = 5.0


@dataclass
class Abort:
    code: grpc.StatusCode
    details: str = ""


class ScriptedServicer(pb_grpc.GenerationServicer):
    """Replays `scripts[i]` on the i-th Generate call (the last script repeats)."""

    def __init__(self) -> None:
        self.address = ""
        self.scripts: list[list[object]] = [[]]
        self.models: list[pb.ModelCard] = []
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.num_list_calls = 0
        # Set when a call ends before its script finished: the client cancelled or its deadline hit.
        self.client_gone = threading.Event()
        self._lock = threading.Lock()

    def Generate(self, request, context):
        with self._lock:
            index = len(self.requests)
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
        # The done callback fires however the call ends, even while this generator is suspended
        # at a `yield` and never resumed (the usual way a cancellation lands).
        ended = threading.Event()
        finished = threading.Event()

        def on_done() -> None:
            ended.set()
            if not finished.is_set():
                self.client_gone.set()

        context.add_callback(on_done)
        for step in self.scripts[min(index, len(self.scripts) - 1)]:
            if isinstance(step, Abort):
                finished.set()
                context.abort(step.code, step.details)
            elif step == HOLD:
                if not ended.wait(HOLD_LIMIT_S):
                    finished.set()  # the client never went away
                return
            else:
                yield step
        finished.set()

    def ListModels(self, request, context):
        self.num_list_calls += 1
        return pb.ListModelsResponse(models=self.models)


def text(delta: str, token_ids: list[int] | None = None) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id="req-1", text=delta, token_ids=token_ids or [])


def state(job_state: int, queue_level: int = 0) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id="req-1", state=job_state, queue_level=queue_level)


def final(reason: int = pb.FINISH_REASON_STOP, prompt_tokens: int = 3, completion_tokens: int = 2):
    return pb.GenerateResponse(
        request_id="req-1",
        finish_reason=reason,
        usage=pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
    )


HELLO = [text("Hel", [1, 2]), text("lo", [3]), final(pb.FINISH_REASON_LENGTH, 4, 3)]
UNAVAILABLE = Abort(grpc.StatusCode.UNAVAILABLE, "frontend restarting")


def serve_double():
    """A double on a free port, stopped when the generator ends (the `double` fixture)."""
    servicer = ScriptedServicer()
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(grace=None)


def make_client(double: ScriptedServicer, **overrides) -> Client:
    return Client(double.address, **{"timeout": 5.0, **overrides})


def make_async_client(double: ScriptedServicer, **overrides) -> AsyncClient:
    return AsyncClient(double.address, **{"timeout": 5.0, **overrides})


@contextlib.contextmanager
def socket_closed_port():
    """An address nothing listens on: a port bound and released."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield f"127.0.0.1:{port}"
