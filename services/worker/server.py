"""The worker's gRPC edge: Info and the Run command stream."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from fastserve.common.v1 import sampling_pb2 as cpb
from fastserve.worker.v1 import worker_pb2 as wpb
from fastserve.worker.v1 import worker_pb2_grpc
from services.worker.batch import Sampling, SeqChunk, TokenLogprobs
from services.worker.executor import CommandError, Executor

log = logging.getLogger(__name__)

SERVICE_NAME = wpb.DESCRIPTOR.services_by_name["Worker"].full_name


def chunk_from_pb(seq: wpb.SeqInput) -> SeqChunk:
    s = seq.sampling
    return SeqChunk(
        job_id=seq.job_id,
        token_ids=list(seq.token_ids),
        start_pos=seq.start_pos,
        block_ids=list(seq.block_ids),
        sample=seq.sample,
        sampling=Sampling(
            temperature=s.temperature,
            top_p=s.top_p or 1.0,
            top_k=s.top_k,
            seed=s.seed if s.has_seed else None,
            logprobs=s.logprobs,
            top_logprobs=s.top_logprobs,
        ),
    )


def _logprobs_pb(logprobs: TokenLogprobs | None) -> cpb.TokenLogprobs | None:
    if logprobs is None:
        return None
    return cpb.TokenLogprobs(
        logprob=logprobs.logprob,
        top=[cpb.TopLogprob(token_id=t, logprob=lp) for t, lp in logprobs.top],
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
        result = wpb.Result(command_id=command.command_id)
        try:
            self._executor.free(command.free_first.job_ids)
            for move in command.swap_out:
                self._executor.swap_out(move.job_id, list(move.block_ids))
            for move in command.swap_in:
                self._executor.swap_in(move.job_id, list(move.block_ids))
            kind = command.WhichOneof("kind")
            if kind == "step":
                output = self._executor.step([chunk_from_pb(s) for s in command.step.seqs])
                result.tokens.extend(
                    wpb.SampledToken(
                        job_id=j, token_id=t, logprobs=_logprobs_pb(output.logprobs.get(j))
                    )
                    for j, t in output.tokens
                )
                result.forward_us = int(output.forward_s * 1e6)
                result.wait_us = int(output.wait_s * 1e6)
            elif kind == "free":
                self._executor.free(command.free.job_ids)
            elif kind == "reset":
                self._executor.reset(command.reset.pipeline_id)
        except (CommandError, ValueError) as exc:  # a malformed command, named by field
            result.error = str(exc)
        except Exception as exc:  # never let one bad command kill the stream
            log.exception("command %d failed", command.command_id)
            result.error = f"internal error: {type(exc).__name__}: {exc}"
        result.swaps_done.extend(
            wpb.SwapDone(
                job_id=done.job_id,
                direction=wpb.SWAP_DIRECTION_IN if done.swap_in else wpb.SWAP_DIRECTION_OUT,
                ok=done.ok,
                error=done.error,
                num_bytes=done.num_bytes,
                duration_us=int(done.duration_s * 1e6),
            )
            for done in self._executor.poll_swaps()
        )
        result.num_swaps_in_flight = self._executor.num_swaps_in_flight
        result.num_used_blocks = self._executor.num_used_blocks
        result.total_us = int((time.perf_counter() - started) * 1e6)
        if self._observer:
            self._observer(result)
        return result
