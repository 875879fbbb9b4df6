"""Several decisions in flight (pipeline stages): schedule() runs again before the previous
decision's update(). Stages execute commands in the order sent, which the simulated worker
models by running each decision when it is sent; its results reach the core only when the
pipeline hands them back, S decisions later."""

from __future__ import annotations

from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.core import EventKind, Job

from .factories import SimWorker, property_settings
from .test_core import reference_output
from .test_kv_memory import make_core
from .test_properties import SimClock, arrivals


def drive_pipelined(core, worker, workload, clock, depth: int, cancel_every: int = 0):
    pending = sorted(enumerate(workload), key=lambda item: item[1].iteration)
    jobs, outputs, finished, cancelled = {}, {}, [], set()
    in_flight: deque = deque()
    iteration = 0

    def complete_oldest() -> None:
        decision, sampled, done = in_flight.popleft()
        for event in core.update(decision, sampled, done):
            outputs.setdefault(event.job_id, []).extend(event.token_ids)
            if event.kind is EventKind.FINISHED:
                finished.append(event.job_id)

    while pending or core.has_work() or in_flight:
        while pending and pending[0][1].iteration <= iteration:
            index, arrival = pending.pop(0)
            prompt = [10 + (index + k) % 50 for k in range(arrival.prompt_len)]
            job = Job(f"j{index}", prompt, arrival.max_tokens)
            (event,) = core.add_job(job)
            if event.kind is EventKind.QUEUED:
                jobs[job.job_id] = job
        if cancel_every and iteration % cancel_every == cancel_every - 1:
            busy = sorted(core.busy_job_ids())
            if busy:  # cancel a job whose token is still in the pipeline
                (event,) = core.cancel(busy[0])
                assert event.finish_reason is not None
                finished.append(event.job_id)
                cancelled.add(busy[0])
        busy_before = core.busy_job_ids()
        decision = core.schedule()
        ran = {chunk.job_id for chunk in decision.chunks}
        assert not ran & busy_before, "a job ran while its previous token was in flight"
        preempted = {e.job_id for e in decision.events if e.kind is EventKind.PREEMPTED}
        assert not preempted & busy_before, "a job in flight was reported preempted"
        evicted = {m.job_id for m in decision.swap_out}
        assert not evicted & busy_before, "a job in flight was evicted"
        clock.tick()
        if decision.is_empty and not core.num_swaps_in_flight:
            if in_flight:  # nothing new to send: wait for the oldest result
                complete_oldest()
            iteration += 1
            continue
        sampled, done = worker.run(decision)
        in_flight.append((decision, sampled, done))
        if len(in_flight) == depth or not decision.chunks:
            complete_oldest()
        iteration += 1
        assert iteration < 5000, "did not drain"
    assert core.num_in_flight == 0
    return jobs, outputs, finished, cancelled


@property_settings(40)
@given(
    workload=arrivals,
    depth=st.integers(2, 3),
    kv_policy=st.sampled_from(["proactive", "recompute"]),
    num_blocks=st.integers(12, 30),
    swap_delay=st.integers(0, 2),
    cancel_every=st.sampled_from([0, 0, 5]),
)
def test_decisions_in_flight_run_disjoint_jobs_and_outputs_stay_exact(
    workload, depth, kv_policy, num_blocks, swap_delay, cancel_every
):
    clock = SimClock()
    core = make_core(kv_policy, num_blocks, clock)
    worker = SimWorker(block_size=4, swap_delay=swap_delay)
    jobs, outputs, finished, cancelled = drive_pipelined(
        core, worker, workload, clock, depth, cancel_every
    )
    assert sorted(finished) == sorted(jobs)
    for job_id, job in jobs.items():
        if job_id not in cancelled:
            assert outputs[job_id] == reference_output(job), job_id
    assert core.blocks.num_free_blocks == core.config.num_blocks


def test_a_second_decision_takes_other_jobs_while_the_first_is_in_flight():
    clock = SimClock()
    core = make_core("recompute", 64, clock, max_batch_size=2)
    for i in range(4):
        core.add_job(Job(f"j{i}", [10 + i, 11, 12], 3))
    first = core.schedule()
    second = core.schedule()
    assert {c.job_id for c in first.chunks} == {"j0", "j1"}
    assert {c.job_id for c in second.chunks} == {"j2", "j3"}
    third = core.schedule()  # everyone is in flight
    assert not third.chunks and core.num_in_flight == 2
    core.update(first, {"j0": 5, "j1": 6})
    fourth = core.schedule()
    assert {c.job_id for c in fourth.chunks} == {"j0", "j1"}
    assert not [e for e in fourth.events if e.kind is EventKind.PREEMPTED]
    core.recompute_all()  # a stage died: nothing in flight will come back
    assert core.num_in_flight == 0
