"""Protobuf <-> core dataclasses for the scheduler's two edges (frontends and workers)."""

from __future__ import annotations

from fastserve.common.v1 import sampling_pb2 as cpb
from fastserve.scheduler.v1 import scheduler_pb2 as spb
from fastserve.worker.v1 import worker_pb2 as wpb
from services.scheduler.core import (
    Decision,
    Event,
    EventKind,
    FinishReason,
    Job,
    SamplingParams,
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


def job_from_submit(submit: spb.Submit, job_id: str) -> Job:
    """Raises ValueError naming the field when the submit is malformed."""
    s = submit.sampling
    sampling = SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p if s.top_p else 1.0,
        top_k=s.top_k,
        seed=s.seed if s.has_seed else None,
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
    )
    return Job(
        job_id=job_id,
        prompt_token_ids=list(submit.prompt_token_ids),
        max_tokens=submit.max_tokens,
        sampling=sampling,
        stop_token_ids=frozenset(submit.stop_token_ids),
        ignore_eos=submit.ignore_eos,
    )


def event_to_pb(event: Event, job_id: str) -> spb.JobEvent:
    return spb.JobEvent(
        job_id=job_id,
        kind=_EVENT_KINDS[event.kind],
        token_ids=event.token_ids,
        queue_level=event.queue_level,
        finish_reason=_FINISH_REASONS[event.finish_reason],
        error=event.error,
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
            sampling=cpb.SamplingParams(
                temperature=chunk.sampling.temperature,
                top_p=chunk.sampling.top_p,
                top_k=chunk.sampling.top_k,
                seed=chunk.sampling.seed or 0,
                has_seed=chunk.sampling.seed is not None,
                logprobs=chunk.sampling.logprobs,
                top_logprobs=chunk.sampling.top_logprobs,
            ),
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
