"""SamplingParams <-> its protobuf message (fastserve.common.v1.SamplingParams), for every
service that sends or receives one: the frontend, the scheduler and the worker."""

from __future__ import annotations

from fastserve.common.v1 import sampling_pb2 as cpb
from services.common.sampling import SamplingParams


def sampling_to_pb(params: SamplingParams) -> cpb.SamplingParams:
    return cpb.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed or 0,
        has_seed=params.seed is not None,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
    )


def sampling_from_pb(message: cpb.SamplingParams) -> SamplingParams:
    """Raises SamplingError (a ValueError) naming the setting that breaks a rule. An unset
    top_p (0 on the wire) means 1."""
    return SamplingParams(
        temperature=message.temperature,
        top_p=message.top_p or 1.0,
        top_k=message.top_k,
        seed=message.seed if message.has_seed else None,
        logprobs=message.logprobs,
        top_logprobs=message.top_logprobs,
    )
