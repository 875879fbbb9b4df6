"""The worker's gRPC edge: Info and the Run command stream. It converts protobuf to and from the
command dataclasses (services/worker/command.py), which the Executor applies, and keeps the GPU
busy across commands: where the device runs asynchronously, the next command is launched before
this one's result is collected, when the scheduler has already sent it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

from fastserve.common.v1 import sampling_pb2 as cpb
from fastserve.worker.v1 import worker_pb2 as wpb
from fastserve.worker.v1 import worker_pb2_grpc
from services.common.sampling import SamplingError, TokenLogprobs
from services.common.sampling_pb import sampling_from_pb
from services.worker.batch import SeqChunk
from services.worker.command import BlockMove, Command, CommandResult, Free, Reset, Step
from services.worker.executor import CommandError, Executor, Launched

log = logging.getLogger(__name__)

SERVICE_NAME = wpb.DESCRIPTOR.services_by_name["Worker"].full_name


def chunk_from_pb(seq: wpb.SeqInput) -> SeqChunk:
    """Raises ValueError (CommandError among them) naming the field of a malformed chunk."""
    sampling = None
    if seq.HasField("sampling"):  # absent: the worker holds the job's settings already
        try:
            sampling = sampling_from_pb(seq.sampling)
        except SamplingError as exc:
            raise CommandError(f"seqs[{seq.job_id}].sampling.{exc.field}: {exc.problem}") from None
    return SeqChunk(
        job_id=seq.job_id,
        token_ids=list(seq.token_ids),
        start_pos=seq.start_pos,
        block_ids=list(seq.block_ids),
        sample=seq.sample,
        sampling=sampling,
        from_last_sample=seq.from_last_sample,
    )


def command_from_pb(command: wpb.Command) -> Command:
    """Raises ValueError (CommandError among them) naming the field of a malformed command."""
    kind = command.WhichOneof("kind")
    action: Step | Free | Reset | None = None
    if kind == "step":
        action = Step([chunk_from_pb(seq) for seq in command.step.seqs])
    elif kind == "free":
        action = Free(list(command.free.job_ids))
    elif kind == "reset":
        action = Reset(command.reset.pipeline_id)
    return Command(
        action=action,
        free_first=list(command.free_first.job_ids),
        swap_out=[BlockMove(m.job_id, list(m.block_ids)) for m in command.swap_out],
        swap_in=[BlockMove(m.job_id, list(m.block_ids)) for m in command.swap_in],
    )


def _logprobs_pb(logprobs: TokenLogprobs | None) -> cpb.TokenLogprobs | None:
    if logprobs is None:
        return None
    return cpb.TokenLogprobs(
        logprob=logprobs.logprob,
        top=[cpb.TopLogprob(token_id=t, logprob=lp) for t, lp in logprobs.top],
    )


def result_to_pb(result: CommandResult, command_id: int) -> wpb.Result:
    return wpb.Result(
        command_id=command_id,
        tokens=[
            wpb.SampledToken(job_id=j, token_id=t, logprobs=_logprobs_pb(result.logprobs.get(j)))
            for j, t in result.tokens
        ],
        forward_us=int(result.forward_s * 1e6),
        wait_us=int(result.wait_s * 1e6),
        total_us=int(result.total_s * 1e6),
        num_used_blocks=result.num_used_blocks,
        error=result.error,
        swaps_done=[
            wpb.SwapDone(
                job_id=done.job_id,
                direction=wpb.SWAP_DIRECTION_IN if done.swap_in else wpb.SWAP_DIRECTION_OUT,
                ok=done.ok,
                error=done.error,
                num_bytes=done.num_bytes,
                duration_us=int(done.duration_s * 1e6),
            )
            for done in result.swaps_done
        ],
        num_swaps_in_flight=result.num_swaps_in_flight,
    )


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(
        self,
        executor: Executor,
        info: wpb.InfoResponse,
        observer: Callable[[wpb.Result], None] | None = None,
        *,
        overlap: bool | None = None,
    ) -> None:
        """`overlap`: launch a command that is already waiting before collecting the result of
        the one before (default: on CUDA, where launching returns before the GPU is done; on
        CPU a launch computes the whole step, and the earlier result would wait for it)."""
        self._executor = executor
        self._info = info
        self._observer = observer  # sees every result (the metrics port)
        if overlap is None:
            overlap = executor.runner.device.type == "cuda"
        self._overlap = overlap
        # One command at a time, whatever the stream: a scheduler that reconnects opens a new
        # stream while the old one may still be finishing a command.
        self._lock = threading.RLock()  # Run holds it over a launch and its finish

    def Info(self, request, context):
        return self._info

    def Run(self, request_iterator, context):
        # Commands arrive in order on one stream and are executed in order; the model forward
        # runs here because there is nothing else for this stage to do meanwhile.
        if not self._overlap:
            for command in request_iterator:
                with self._lock:
                    result = self._finish(*self._launch(command))
                yield result
            return
        # Command k + 1 is launched (its step queued behind step k on the GPU) before step k's
        # tokens are waited for, if it has arrived; results still go out in order.
        commands = _read_ahead(request_iterator)
        pending: tuple[wpb.Command, Launched, float] | None = None
        while True:
            try:
                command = commands.get_nowait() if pending is not None else commands.get()
            except queue.Empty:  # nothing to launch meanwhile: collect the pending result
                assert pending is not None
                yield self._finish(*pending)
                pending = None
                continue
            if command is None:  # the stream ended
                if pending is not None:
                    yield self._finish(*pending)
                return
            launched = self._launch(command)
            if pending is not None:
                yield self._finish(*pending)
            pending = launched

    def _launch(self, command: wpb.Command) -> tuple[wpb.Command, Launched, float]:
        started = time.perf_counter()
        try:
            parsed = command_from_pb(command)
        except ValueError as exc:  # malformed: nothing is applied, the worker's state reported
            launched = Launched(started=started, error=str(exc))
        else:
            with self._lock:
                launched = self._executor.launch(parsed)
        return command, launched, started

    def _finish(self, command: wpb.Command, launched: Launched, started: float) -> wpb.Result:
        with self._lock:
            result = result_to_pb(self._executor.finish(launched), command.command_id)
        result.total_us = int((time.perf_counter() - started) * 1e6)
        if self._observer:
            self._observer(result)
        return result


def _read_ahead(request_iterator: Iterator[wpb.Command]) -> queue.Queue[wpb.Command | None]:
    """The stream's commands as they arrive, read by a thread; None once it ends."""
    commands: queue.Queue[wpb.Command | None] = queue.Queue()

    def read() -> None:
        try:
            for command in request_iterator:
                commands.put(command)
        except Exception as exc:  # the stream was cancelled or broke: it ends here
            log.debug("command stream ended: %s", exc)
        finally:
            commands.put(None)

    threading.Thread(target=read, name="command-reader", daemon=True).start()
    return commands
