"""Async decoding in the pure core: a decoding job's next step is scheduled while its current
one is in flight, and the worker runs the token it has just sampled. Driven as the engine
drives it (two decisions in flight on one stage) against a worker double that executes each
decision when it is sent, as the real worker does, and keeps what it sampled: outputs must be
those of the jobs run one token at a time, through stops, length limits, preemption,
recompute and cancels."""

from __future__ import annotations

from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.core import Decision, Job
from tests.scheduler.factories import (
    STOP_TOKEN,
    fake_model,
    make_scheduler,
    property_settings,
)


def stopping_model(tokens: list[int | None]) -> int:
    """As fake_model, but says STOP now and then, so jobs end before their length."""
    token = fake_model(tokens)
    return STOP_TOKEN if token % 11 == 0 else token


def expected_output(job: Job, model) -> list[int]:
    tokens: list[int | None] = list(job.prompt_token_ids)
    out = []
    for _ in range(job.max_tokens):
        if len(tokens) >= 256:  # make_scheduler's max_model_len
            break
        token = model(tokens)
        out.append(token)
        tokens.append(token)
        if token == STOP_TOKEN:
            break
    return out


class WorkerDouble:
    """Executes a decision when it is sent: keeps each job's tokens in its "KV" and the token
    it sampled last, and runs that token for a chunk `from_last_sample`."""

    def __init__(self, model) -> None:
        self.model = model
        self.kv: dict[str, list[int]] = {}
        self.last: dict[str, int] = {}
        self.num_async = 0

    def execute(self, decision: Decision) -> dict[str, int]:
        for job_id in decision.free_job_ids:
            self.kv.pop(job_id, None)
            self.last.pop(job_id, None)
        sampled = {}
        for chunk in decision.chunks:
            tokens = list(chunk.token_ids)
            if chunk.from_last_sample:
                self.num_async += 1
                tokens = [self.last[chunk.job_id]]
            kv = self.kv.setdefault(chunk.job_id, [])
            assert len(kv) >= chunk.start_pos, "a chunk starts past the KV the worker holds"
            del kv[chunk.start_pos :]  # recomputed from there
            kv.extend(tokens)
            if chunk.sample:
                sampled[chunk.job_id] = self.model(kv)
        self.last = {**self.last, **sampled}
        return sampled


def run_async(core, jobs: list[tuple[int, Job]], model, cancel_at: dict[str, int] | None = None):
    """Arrivals (step, job) and cancels (job id -> step), two decisions in flight as the
    engine keeps them with one stage and async decoding."""
    worker = WorkerDouble(model)
    in_flight: deque[tuple[Decision, dict[str, int]]] = deque()
    pending = sorted(jobs, key=lambda pair: pair[0])
    cancels = dict(cancel_at or {})
    step = 0
    while pending or core.has_work() or in_flight:
        while pending and pending[0][0] <= step:
            core.add_job(pending.pop(0)[1])
        for job_id, when in list(cancels.items()):
            if when <= step:
                core.cancel(job_id)
                del cancels[job_id]
        sent = False
        if len(in_flight) < 2:
            decision = core.schedule()
            if not decision.is_empty:
                in_flight.append((decision, worker.execute(decision)))
                sent = bool(decision.chunks)
        if not sent and in_flight:
            decision, tokens = in_flight.popleft()
            core.update(decision, tokens)
        step += 1
        assert step < 20_000
    return worker


def test_a_decoding_job_runs_its_next_token_before_the_scheduler_has_seen_it():
    core = make_scheduler("fcfs", async_decode=True, max_batch_size=4)
    jobs = [
        Job(f"j{i}", [10 + i, 20, 30], max_tokens=12, stop_token_ids=frozenset()) for i in range(3)
    ]
    worker = run_async(core, [(0, job) for job in jobs], fake_model)
    assert worker.num_async > 10  # most decode steps went ahead of their token
    for job in jobs:
        assert job.output_token_ids == expected_output(job, fake_model)
    assert core.blocks.num_free_blocks == core.blocks.num_blocks


def test_without_async_decoding_no_chunk_waits_on_the_worker():
    core = make_scheduler("fcfs", max_batch_size=4)
    jobs = [Job(f"j{i}", [10 + i, 20, 30], max_tokens=6) for i in range(2)]
    worker = run_async(core, [(0, job) for job in jobs], fake_model)
    assert worker.num_async == 0
    for job in jobs:
        assert job.output_token_ids == expected_output(job, fake_model)


@given(
    lengths=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 14)), min_size=1, max_size=8),
    arrivals=st.lists(st.integers(0, 10), min_size=8, max_size=8),
    cancels=st.lists(st.one_of(st.none(), st.integers(0, 30)), min_size=8, max_size=8),
    num_blocks=st.sampled_from([8, 12, 64]),
    policy=st.sampled_from(["fcfs", "skip-join-mlfq"]),
)
@property_settings(60)
def test_async_decoding_never_changes_an_output(lengths, arrivals, cancels, num_blocks, policy):
    """Stops, length limits, preemption (batch cap 3), recompute (small pools), cancels."""
    core = make_scheduler(
        policy, async_decode=True, num_blocks=num_blocks, block_size=4, max_batch_size=3
    )
    jobs = [
        Job(
            f"j{i}",
            [10 + (i * 7 + k) % 50 for k in range(prompt)],
            max_tokens=out,
            stop_token_ids=frozenset({STOP_TOKEN}),
        )
        for i, (prompt, out) in enumerate(lengths)
    ]
    cancel_at = {
        job.job_id: when for job, when in zip(jobs, cancels, strict=False) if when is not None
    }
    run_async(core, list(zip(arrivals, jobs, strict=False)), stopping_model, cancel_at)
    for job in jobs:
        if job.job_id in cancel_at:
            # Cancelled: whatever it got is the start of its output.
            full = expected_output(job, stopping_model)
            assert job.output_token_ids == full[: len(job.output_token_ids)]
        else:
            assert job.output_token_ids == expected_output(job, stopping_model)
    assert core.num_jobs == 0
    assert core.blocks.num_free_blocks + core.blocks.num_cached_blocks >= 0
    assert core.blocks.num_free_blocks == core.blocks.num_blocks


def test_a_job_short_of_blocks_still_takes_them_from_decoding_jobs_behind_it():
    """Decoding jobs ahead of their token are always in flight, and a job in flight is never
    evicted: without care, a higher-class arrival that needs their blocks would wait for them
    to finish. They sit out an iteration instead, and it gets the blocks."""
    core = make_scheduler("fcfs", async_decode=True, num_blocks=10, block_size=4, max_batch_size=8)
    low = [
        Job(f"low{i}", [10 + i] * 14, max_tokens=20, priority=1, stop_token_ids=frozenset())
        for i in range(2)
    ]
    worker = WorkerDouble(fake_model)
    in_flight: deque[tuple[Decision, dict[str, int]]] = deque()

    def step() -> Decision:
        decision = core.schedule()
        in_flight.append((decision, worker.execute(decision)))
        if len(in_flight) == 2:
            core.update(*in_flight.popleft())
        return decision

    for job in low:
        core.add_job(job)
    for _ in range(4):
        step()
    assert core.blocks.num_free_blocks < 3  # the low jobs hold the pool, decoding ahead
    urgent = Job("urgent", [40] * 12, max_tokens=4, priority=0, stop_token_ids=frozenset())
    core.add_job(urgent)
    ran_at = next((n for n in range(6) if "urgent" in {c.job_id for c in step().chunks}), None)
    assert ran_at is not None and ran_at <= 2, ran_at
    while in_flight or core.has_work():
        if core.has_work() and len(in_flight) < 2:
            decision = core.schedule()
            if not decision.is_empty:
                in_flight.append((decision, worker.execute(decision)))
                if decision.chunks:
                    continue
        core.update(*in_flight.popleft())
    for job in [*low, urgent]:
        assert job.output_token_ids == expected_output(job, fake_model)
