"""The scheduler's Engine over the in-process pipeline: its real loop (decisions in flight, one
per stage), the real runner on every stage, no processes. Greedy output must equal
transformers', and jobs that asked for logprobs get one per token."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from services.scheduler.core import (
    EventKind,
    FinishReason,
    Job,
    SamplingParams,
    SchedulerConfig,
    SchedulerCore,
)
from services.scheduler.core.policies import make_policy
from services.scheduler.engine import Engine
from services.scheduler.inbox import Cancel, Submit
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.pipeline import StageGroup
from services.worker.stage_layout import split_layers
from testing import local_pipeline as local_pipeline_module
from testing.local_pipeline import LocalPipeline, worker_command
from testing.oracle import assert_greedy_matches, hf_greedy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_pipeline(model, layer_split: list[int], num_blocks: int) -> LocalPipeline:
    ranges = split_layers(model.config.num_hidden_layers, len(layer_split), layer_split)
    rendezvous = f"127.0.0.1:{free_port()}"
    executors = []
    for index, layers in enumerate(ranges):
        runner = ModelRunner(model, num_blocks=num_blocks, block_size=16, layers=layers)
        group = None
        if len(ranges) > 1:
            group = StageGroup(index, len(ranges), rendezvous, device=torch.device("cpu"))
        executors.append(Executor(runner, stages=group))
    return LocalPipeline(executors)


@pytest.mark.parametrize(
    ("layer_split", "async_decode"), [([4], False), ([4], True), ([2, 2], False)]
)
def test_the_engine_runs_jobs_on_in_process_stages(
    tiny_hf_model, layer_split, async_decode, monkeypatch
):
    num_blocks, max_tokens = 12, 12
    config = SchedulerConfig(
        num_blocks=num_blocks, block_size=16, max_model_len=512, max_batch_size=3,
        max_batched_tokens=64, async_decode=async_decode,
    )  # fmt: skip
    num_ahead = 0  # chunks that ran the token the worker had just sampled

    def counting(decision):
        nonlocal num_ahead
        num_ahead += sum(chunk.from_last_sample for chunk in decision.chunks)
        return worker_command(decision)

    monkeypatch.setattr(local_pipeline_module, "worker_command", counting)
    policy = make_policy("fcfs", max_model_len=512, max_batch_size=3)
    engine = Engine(
        SchedulerCore(config, policy), local_pipeline(tiny_hf_model, layer_split, num_blocks)
    )
    engine.start()
    outbox = engine.connect("frontend")
    wants_logprobs = SamplingParams(logprobs=True, top_logprobs=2)
    jobs = [
        Job(f"j{i}", [5 + i, 6, 7, 8] * (1 + i), max_tokens,
            sampling=wants_logprobs if i % 2 else SamplingParams())
        for i in range(6)
    ]  # fmt: skip
    engine.post(Submit("frontend", jobs, []))
    tokens: dict[str, list[int]] = {job.job_id: [] for job in jobs}
    num_logprobs = dict.fromkeys(tokens, 0)
    finished: set[str] = set()
    deadline = time.monotonic() + 120
    try:
        while len(finished) < len(jobs):
            assert time.monotonic() < deadline, "the engine did not finish the jobs"
            message = outbox.get(timeout=60)
            assert message is not None
            for event in message.events:
                tokens[event.job_id].extend(event.token_ids)
                num_logprobs[event.job_id] += len(event.logprobs)
                if event.kind is EventKind.FINISHED:
                    finished.add(event.job_id)
    finally:
        engine.stop()
    for job in jobs:
        ref = hf_greedy(tiny_hf_model, job.prompt_token_ids, max_tokens)
        assert_greedy_matches(tiny_hf_model, job.prompt_token_ids, tokens[job.job_id], ref)
        assert num_logprobs[job.job_id] == (max_tokens if job.sampling.logprobs else 0)
    assert [stage.num_commands > 0 for stage in engine.stats.stages] == [True] * len(layer_split)
    assert (num_ahead > 0) is async_decode


def drain_until(outbox, done, timeout_s: float = 60.0) -> list:
    """Events from `outbox` until `done(events so far)`."""
    events: list = []
    deadline = time.monotonic() + timeout_s
    while not done(events):
        assert time.monotonic() < deadline, f"timed out; got {events}"
        message = outbox.get(timeout=timeout_s)
        assert message is not None
        events.extend(message.events)
    return events


def test_events_reach_their_owner_and_only_the_owner_may_cancel(tiny_hf_model):
    """A job belongs to the frontend that submitted it: its events go there alone, another
    frontend's cancel of it is ignored, and a frontend's disconnect cancels only its own."""
    config = SchedulerConfig(num_blocks=32, block_size=16, max_model_len=512, max_batch_size=4)
    policy = make_policy("fcfs", max_model_len=512, max_batch_size=4)
    engine = Engine(SchedulerCore(config, policy), local_pipeline(tiny_hf_model, [4], 32))
    engine.start()
    a, b = engine.connect("a"), engine.connect("b")
    try:
        engine.post(Submit("a", [Job("a1", [5, 6, 7], 8)], [("a-bad", "max_tokens: too many")]))
        engine.post(Submit("b", [Job("b1", [5, 6, 8], 400, ignore_eos=True)], []))
        engine.post(Cancel("b", ["a1"]))  # not b's job: ignored
        a_events = drain_until(a, lambda evs: any(e.kind is EventKind.FINISHED for e in evs))
        assert {e.job_id for e in a_events} == {"a1", "a-bad"}
        assert {e.owner for e in a_events} == {"a"}
        (finished,) = [e for e in a_events if e.kind is EventKind.FINISHED]
        assert finished.finish_reason is FinishReason.LENGTH  # ran to the end, not cancelled
        assert [e.error for e in a_events if e.kind is EventKind.REJECTED] == [
            "max_tokens: too many"
        ]
        b_events = drain_until(b, lambda evs: any(e.kind is EventKind.TOKENS for e in evs))
        assert {e.job_id for e in b_events} == {"b1"} and {e.owner for e in b_events} == {"b"}
        engine.post(Submit("a", [Job("a2", [9, 9, 9], 400, ignore_eos=True)], []))
        drain_until(a, lambda evs: any(e.kind is EventKind.TOKENS for e in evs))
        engine.disconnect("a")  # a's jobs go; b's keeps running
        deadline = time.monotonic() + 30
        while engine.stats.core.counters.num_cancelled_jobs < 1:
            assert time.monotonic() < deadline, "a2 was not cancelled"
            time.sleep(0.01)
        more = drain_until(b, lambda evs: sum(len(e.token_ids) for e in evs) >= 3)
        assert all(e.job_id == "b1" and e.kind is EventKind.TOKENS for e in more)
        engine.post(Cancel("b", ["b1"]))
        drain_until(b, lambda evs: any(e.kind is EventKind.FINISHED for e in evs))
        assert engine.stats.core.counters.num_cancelled_jobs == 2
    finally:
        engine.stop()
