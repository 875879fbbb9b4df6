"""The scheduler's side of a worker: Info, and one long-lived Run stream of commands."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from fastserve.worker.v1 import worker_pb2 as wpb
from fastserve.worker.v1 import worker_pb2_grpc
from services.common.grpc_server import GRPC_OPTIONS
from services.scheduler.convert import decision_to_command
from services.scheduler.core import Decision, SwapResult

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


@dataclass(frozen=True, slots=True)
class StepResult:
    tokens: dict[str, int]  # job id -> sampled token
    forward_s: float  # model forward + sampling on the worker
    total_s: float  # whole command on the worker
    num_used_blocks: int  # blocks the worker holds for jobs after the command
    swaps_done: list[SwapResult]  # background swaps that finished
    num_swaps_in_flight: int


class WorkerLink:
    def __init__(self, address: str) -> None:
        self.address = address
        self._target = address  # where the next open() connects (discovery may move it)
        self._target_lock = threading.Lock()
        self._channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._requests: queue.SimpleQueue[wpb.Command | None] | None = None
        self._responses = None
        self._next_command_id = 1

    def wait_for_info(self, timeout_s: float) -> WorkerInfo:
        """Polls Info until the worker answers (it may still be loading the model)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = self._stub.Info(wpb.InfoRequest(), timeout=5)
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
                )
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise WorkerError(f"worker {self.address} did not answer: {exc}") from exc
                time.sleep(0.2)

    def retarget(self, address: str | None) -> None:
        """The worker moved (a replaced pod): the next open() connects to `address`. Safe to
        call from any thread; the engine reopens when the old stream breaks."""
        if address:
            with self._target_lock:
                self._target = address

    def open(self) -> None:
        """(Re)opens the Run stream and resets the worker's block ownership."""
        self.close()
        with self._target_lock:
            target = self._target
        if target != self.address:
            log.info("worker moved: %s -> %s", self.address, target)
            self._channel.close()
            self.address = target
            self._channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
            self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        requests: queue.SimpleQueue[wpb.Command | None] = queue.SimpleQueue()
        self._requests = requests
        self._responses = self._stub.Run(iter(requests.get, None))
        self._call(wpb.Command(reset=wpb.Reset()))

    def execute(self, decision: Decision) -> StepResult:
        result = self._call(decision_to_command(decision, 0))
        return StepResult(
            tokens={t.job_id: t.token_id for t in result.tokens},
            forward_s=result.forward_us / 1e6,
            total_s=result.total_us / 1e6,
            num_used_blocks=result.num_used_blocks,
            swaps_done=[
                SwapResult(
                    job_id=done.job_id,
                    swap_in=done.direction == wpb.SWAP_DIRECTION_IN,
                    ok=done.ok,
                    num_bytes=done.num_bytes,
                    duration_s=done.duration_us / 1e6,
                )
                for done in result.swaps_done
            ],
            num_swaps_in_flight=result.num_swaps_in_flight,
        )

    def _call(self, command: wpb.Command) -> wpb.Result:
        if self._requests is None or self._responses is None:
            raise WorkerError("worker stream is not open")
        command.command_id = self._next_command_id
        self._next_command_id += 1
        self._requests.put(command)
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
