"""Priority classes in the pure core: a higher class (a smaller number) always runs first and
preempts a lower one at the next iteration, under the batch cap and under KV pressure; the
policy still orders jobs within a class; outputs are those of the same jobs run alone."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.core import EventKind, Job
from services.scheduler.core.decision import SwapResult
from services.scheduler.core.priority import by_class, by_class_enst
from tests.scheduler.factories import (
    fake_model,
    make_jobs,
    make_scheduler,
    property_settings,
    run_iteration,
    run_until_idle,
)


def expected_output(job: Job) -> list[int]:
    tokens = list(job.prompt_token_ids)
    for _ in range(job.max_tokens):
        tokens.append(fake_model(tokens))
    return tokens[job.num_prompt_tokens :]


def copy(job: Job) -> Job:
    return Job(
        job_id=job.job_id,
        prompt_token_ids=list(job.prompt_token_ids),
        max_tokens=job.max_tokens,
        priority=job.priority,
    )


def test_the_class_comes_first_and_the_policy_orders_within_a_class():
    jobs = [Job(f"j{i}", [1, 2], 4, priority=p) for i, p in enumerate([2, 0, 1, 0, 2, 1])]
    assert [j.job_id for j in by_class(jobs)] == ["j1", "j3", "j2", "j5", "j0", "j4"]


def test_class_enst_puts_every_lower_class_after_every_higher_one_and_keeps_the_order_within():
    jobs = [
        Job("a", [1], 1, priority=1),
        Job("b", [1], 1, priority=0),
        Job("c", [1], 1, priority=1),
    ]
    enst = by_class_enst(jobs, {"a": 0.0, "b": 50.0, "c": float("inf")})
    assert enst["b"] < enst["a"] < enst["c"]
    assert by_class_enst(jobs[1:2], {"b": 3.0}) == {"b": 3.0}  # one class: the policy's values


@pytest.mark.parametrize("policy", ["fcfs", "skip-join-mlfq"])
def test_a_burst_of_high_class_jobs_preempts_running_low_class_ones_within_one_iteration(policy):
    core = make_scheduler(policy, max_batch_size=4)
    low = make_jobs(4, prompt_len=6, max_tokens=30, priority=1)
    for job in low:
        core.add_job(job)
    for _ in range(3):
        decision, _ = run_iteration(core)
    assert sorted(c.job_id for c in decision.chunks) == [j.job_id for j in low]
    high = [Job(f"h{i}", [7, 8, 9, 10 + i], 5, priority=0) for i in range(3)]
    for job in high:
        core.add_job(job)
    decision, _ = run_iteration(core)  # the very next iteration
    ran = [c.job_id for c in decision.chunks]
    assert ran[:3] == ["h0", "h1", "h2"]  # all of the burst, first
    assert len(ran) == 4  # and the one place left to a low-class job
    preempted = {e.job_id for e in decision.events if e.kind is EventKind.PREEMPTED}
    assert len(preempted) == 3 and preempted <= {j.job_id for j in low}
    run_until_idle(core)
    for job in [*low, *high]:
        assert job.output_token_ids == expected_output(job)


def test_a_high_class_arrival_takes_the_kv_of_low_class_jobs_when_blocks_run_short():
    """With nothing computed, an arrival of the same class waits for free blocks (so MLFQ does
    not thrash); one of a higher class takes them from lower-class jobs at once."""
    for priority, runs_at_once in ((1, False), (0, True)):
        core = make_scheduler("skip-join-mlfq", num_blocks=10, block_size=4, max_batch_size=8)
        low = make_jobs(2, prompt_len=14, max_tokens=6, priority=1)
        for job in low:
            core.add_job(job)
        run_iteration(core)
        assert core.blocks.num_free_blocks == 2
        arrival = Job("new", list(range(20, 32)), 4, priority=priority)
        core.add_job(arrival)
        decision, _ = run_iteration(core)
        assert ("new" in {c.job_id for c in decision.chunks}) is runs_at_once
        run_until_idle(core)
        for job in [*low, arrival]:
            assert job.output_token_ids == expected_output(job)


def test_with_swapping_the_lower_class_is_swapped_out_first():
    core = make_scheduler(
        "skip-join-mlfq",
        num_blocks=9,
        block_size=4,
        max_batch_size=8,
        kv_policy="reactive",
        swap_enabled=True,
        swap_cost_scale=0.0,
    )
    mid = Job("mid", list(range(10, 22)), 20, priority=1)
    low = Job("low", list(range(30, 42)), 20, priority=2)
    core.add_job(low)
    core.add_job(mid)
    for _ in range(2):
        run_iteration(core)
    core.add_job(Job("top", list(range(50, 62)), 4, priority=0))
    decision = core.schedule()
    assert [m.job_id for m in decision.swap_out] == ["low"]
    assert decision.chunks[0].job_id == "top"
    core.update(
        decision,
        {c.job_id: 5 for c in decision.chunks if c.sample},
        [SwapResult("low", "out", True)],
    )


@given(
    priorities=st.lists(st.integers(0, 2), min_size=1, max_size=10),
    arrivals=st.lists(st.integers(0, 6), min_size=10, max_size=10),
    num_blocks=st.sampled_from([10, 16, 64]),
    policy=st.sampled_from(["fcfs", "skip-join-mlfq"]),
)
@property_settings(40)
def test_classes_change_the_order_never_the_outputs(priorities, arrivals, num_blocks, policy):
    """Whatever the classes and arrival times, every job finishes with the output it has run
    alone, and in no iteration does a lower-class job run while a higher-class job that could
    have run (runnable, not busy, with room in the batch) is left out."""
    core = make_scheduler(policy, num_blocks=num_blocks, max_batch_size=3)
    jobs = [
        Job(f"j{i}", [10 + (i * 7 + k) % 50 for k in range(3 + i % 5)], 2 + i % 6, priority=p)
        for i, p in enumerate(priorities)
    ]
    by_id = {job.job_id: job for job in jobs}
    pending = sorted(zip(arrivals, jobs, strict=False), key=lambda pair: pair[0])
    step = 0
    while pending or core.has_work():
        while pending and pending[0][0] <= step:
            core.add_job(pending.pop(0)[1])
        decision, _ = run_iteration(core)
        ran = {c.job_id for c in decision.chunks}
        if ran:
            lowest_ran = max(by_id[job_id].priority for job_id in ran)
            left_out = [
                job
                for job_id in core.job_ids()
                if job_id not in ran
                and job_id not in decision.blocked_job_ids
                and (job := core.job(job_id)) is not None
                and job.kv_state.is_runnable
            ]
            assert all(job.priority >= lowest_ran for job in left_out)
        step += 1
        assert step < 5_000
    for job in jobs:
        assert job.output_token_ids == expected_output(job)


def test_stats_count_jobs_per_class_waiting_and_running():
    core = make_scheduler("fcfs", max_batch_size=2)
    for job in [Job("a", [1, 2], 9, priority=0), Job("b", [1, 3], 9, priority=2)]:
        core.add_job(job)
    core.add_job(Job("c", [1, 4], 9, priority=2))
    run_iteration(core)
    assert core.stats().num_jobs_per_class == ((0, 0, 1), (1, 0, 0), (2, 1, 1))


def test_a_class_out_of_range_is_refused():
    with pytest.raises(ValueError, match="priority"):
        Job("x", [1], 1, priority=16)
