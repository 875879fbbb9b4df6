"""The worker's gRPC edge: Info and the Run command stream. It only converts protobuf to and
from the command dataclasses (services/worker/command.py); Executor.run applies them."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from fastserve.common.v1 import sampling_pb2 as cpb
from fastserve.worker.v1 import worker_pb2 as wpb
from fastserve.worker.v1 import worker_pb2_grpc
from services.common.sampling import SamplingError, TokenLogprobs
from services.common.sampling_pb import sampling_from_pb
from services.worker.batch import SeqChunk
from services.worker.command import BlockMove, Command, CommandResult, Free, Reset, Step
from services.worker.executor import CommandError, Executor

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
    ) -> None:
        self._executor = executor
        self._info = info
        self._observer = observer  # sees every result (the metrics port)
        # One command at a time, whatever the stream: a scheduler that reconnects opens a new
        # stream while the old one may still be finishing a command.
        self._lock = threading.Lock()

    def Info(self, request, context):
        return self._info

    def Run(self, request_iterator, context):
        # Commands arrive in order on one stream and are executed in order; the model forward
        # runs here because there is nothing else for this stage to do meanwhile.
        for command in request_iterator:
            with self._lock:
                result = self._execute(command)
            yield result

    def _execute(self, command: wpb.Command) -> wpb.Result:
        started = time.perf_counter()
        try:
            error = ""
            parsed = command_from_pb(command)
        except ValueError as exc:  # malformed: nothing is applied, the worker's state reported
            error, parsed = str(exc), Command()
        result = result_to_pb(self._executor.run(parsed), command.command_id)
        if error:
            result.error = error
        result.total_us = int((time.perf_counter() - started) * 1e6)
        if self._observer:
            self._observer(result)
        return result
