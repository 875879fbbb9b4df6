"""The scheduler's side of one worker (one pipeline stage): Info, and one long-lived Run
stream of commands. `send` and `receive` are separate so that several commands can be in
flight (pipeline stages); `execute` is the two back to back."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from fastserve.worker.v1 import worker_pb2 as wpb
from fastserve.worker.v1 import worker_pb2_grpc
from services.common.grpc_server import CHANNEL_OPTIONS

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The worker failed a command or its stream broke."""


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    model_name: str
    num_blocks: int
    block_size: int
    max_model_len: int
    device: str
    dtype: str
    vocab_size: int
    block_bytes: int
    swap_enabled: bool
    stage_index: int = 0
    num_stages: int = 1
    first_layer: int = 0
    num_layers: int = 0
    num_total_layers: int = 0
    layer_split: tuple[int, ...] = ()  # layers per stage (the whole pipeline's view)


def info_from_pb(reply: wpb.InfoResponse) -> WorkerInfo:
    return WorkerInfo(
        model_name=reply.model_name,
        num_blocks=reply.num_blocks,
        block_size=reply.block_size_tokens,
        max_model_len=reply.max_model_len,
        device=reply.device,
        dtype=reply.dtype,
        vocab_size=reply.vocab_size,
        block_bytes=reply.block_bytes,
        swap_enabled=reply.swap_enabled,
        stage_index=reply.stage_index,
        num_stages=max(1, reply.num_stages),
        first_layer=reply.first_layer,
        num_layers=reply.num_layers,
        num_total_layers=reply.num_total_layers,
    )


class WorkerLink:
    def __init__(self, address: str) -> None:
        self.address = address
        self._target = address  # where the next connect() goes (discovery may move it)
        self._target_lock = threading.Lock()
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._requests: queue.SimpleQueue[wpb.Command | None] | None = None
        self._responses = None

    def info(self, timeout_s: float = 5.0) -> WorkerInfo:
        try:
            return info_from_pb(self._stub.Info(wpb.InfoRequest(), timeout=timeout_s))
        except grpc.RpcError as exc:
            raise WorkerError(f"worker {self.address} did not answer Info: {exc}") from exc

    def wait_for_info(self, timeout_s: float) -> WorkerInfo:
        """Polls Info until the worker answers (it may still be loading the model)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._follow_target()
            try:
                return self.info()
            except WorkerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def retarget(self, address: str | None) -> None:
        """The worker moved (a replaced pod): the next connect() goes to `address`. Safe to
        call from any thread; the engine reconnects when the old stream breaks."""
        if address:
            with self._target_lock:
                self._target = address

    def _follow_target(self) -> None:
        with self._target_lock:
            target = self._target
        if target != self.address:
            log.info("worker moved: %s -> %s", self.address, target)
            self._channel.close()
            self.address = target
            self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            self._stub = worker_pb2_grpc.WorkerStub(self._channel)

    def connect(self) -> None:
        """(Re)opens the Run stream; the caller sends a Reset first."""
        self.close()
        self._follow_target()
        requests: queue.SimpleQueue[wpb.Command | None] = queue.SimpleQueue()
        self._requests = requests
        self._responses = self._stub.Run(iter(requests.get, None))

    def open(self, pipeline_id: str = "") -> None:
        """Connects and resets the worker's block ownership (one stage on its own)."""
        self.connect()
        self.send(wpb.Command(reset=wpb.Reset(pipeline_id=pipeline_id)))
        self.receive()

    def send(self, command: wpb.Command) -> None:
        """Queues a command as it is (its command_id is the decision's iteration id; 0 for a
        Reset or a command outside an iteration)."""
        if self._requests is None:
            raise WorkerError(f"worker {self.address}: stream is not open")
        self._requests.put(command)

    def receive(self) -> wpb.Result:
        """The result of the oldest command sent and not yet received."""
        if self._responses is None:
            raise WorkerError(f"worker {self.address}: stream is not open")
        try:
            result = next(self._responses)
        except (grpc.RpcError, StopIteration) as exc:
            self._requests = None
            raise WorkerError(f"worker {self.address} stream broke: {exc}") from exc
        if result.error:
            raise WorkerError(f"worker {self.address}: {result.error}")
        return result

    def close(self) -> None:
        if self._requests is not None:
            self._requests.put(None)
        if self._responses is not None:
            self._responses.cancel()
        self._requests = self._responses = None
