"""Protobuf <-> core dataclasses for the scheduler's two edges (frontends and workers)."""

from __future__ import annotations

from fastserve.common.v1 import sampling_pb2 as cpb
from fastserve.scheduler.v1 import scheduler_pb2 as spb
from fastserve.worker.v1 import worker_pb2 as wpb
from services.common.sampling import SamplingError
from services.common.sampling_pb import sampling_from_pb, sampling_to_pb
from services.scheduler.core import (
    Decision,
    Event,
    EventKind,
    FinishReason,
    Job,
    TokenLogprobs,
)

_EVENT_KINDS = {
    EventKind.QUEUED: spb.EVENT_KIND_QUEUED,
    EventKind.TOKENS: spb.EVENT_KIND_TOKENS,
    EventKind.PREEMPTED: spb.EVENT_KIND_PREEMPTED,
    EventKind.RESUMED: spb.EVENT_KIND_RESUMED,
    EventKind.FINISHED: spb.EVENT_KIND_FINISHED,
    EventKind.REJECTED: spb.EVENT_KIND_REJECTED,
}
_FINISH_REASONS = {
    None: spb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: spb.FINISH_REASON_STOP,
    FinishReason.LENGTH: spb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: spb.FINISH_REASON_CANCELLED,
    FinishReason.ABORTED: spb.FINISH_REASON_ABORTED,
}


def job_from_submit(submit: spb.Submit) -> Job:
    """Raises ValueError naming the field when the submit is malformed."""
    try:
        sampling = sampling_from_pb(submit.sampling)
    except SamplingError as exc:
        raise SamplingError(f"sampling.{exc.field}", exc.problem) from None
    return Job(
        job_id=submit.job_id,
        prompt_token_ids=list(submit.prompt_token_ids),
        max_tokens=submit.max_tokens,
        sampling=sampling,
        stop_token_ids=frozenset(submit.stop_token_ids),
        ignore_eos=submit.ignore_eos,
        priority=submit.priority,
    )


def event_to_pb(event: Event) -> spb.JobEvent:
    return spb.JobEvent(
        job_id=event.job_id,
        kind=_EVENT_KINDS[event.kind],
        token_ids=event.token_ids,
        queue_level=event.queue_level,
        finish_reason=_FINISH_REASONS[event.finish_reason],
        error=event.error,
        retry=event.retry,
        num_cached_tokens=event.num_cached_tokens,
        logprobs=[
            cpb.TokenLogprobs(
                logprob=lp.logprob,
                top=[cpb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
            )
            for lp in event.logprobs
        ],
    )


def logprobs_from_pb(logprobs: cpb.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(logprobs.logprob, tuple((t.token_id, t.logprob) for t in logprobs.top))


def decision_to_command(decision: Decision, command_id: int) -> wpb.Command:
    seqs = [
        wpb.SeqInput(
            job_id=chunk.job_id,
            token_ids=chunk.token_ids,
            start_pos=chunk.start_pos,
            block_ids=chunk.block_ids,
            sample=chunk.sample,
            # Absent when the workers hold the job's settings already (see worker.proto).
            sampling=None if chunk.sampling is None else sampling_to_pb(chunk.sampling),
            from_last_sample=chunk.from_last_sample,
        )
        for chunk in decision.chunks
    ]
    return wpb.Command(
        command_id=command_id,
        step=wpb.Step(seqs=seqs),
        free_first=wpb.Free(job_ids=decision.free_job_ids),
        swap_out=[wpb.BlockMove(job_id=m.job_id, block_ids=m.block_ids) for m in decision.swap_out],
        swap_in=[wpb.BlockMove(job_id=m.job_id, block_ids=m.block_ids) for m in decision.swap_in],
    )
