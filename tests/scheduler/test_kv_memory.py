"""KV placement under pressure: swap vs recompute, proactive reserve and prefetch, failures.
A simulated worker keeps real token ids in its blocks and kvstore, so a block-table or swap
bookkeeping error changes the fake model's output."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.core import EventKind, Job, KvState, SchedulerConfig, SchedulerCore
from services.scheduler.core.profile import PerformanceProfile
from services.scheduler.core.swap_cost import SwapCostModel

from .factories import SimWorker, property_settings
from .test_core import reference_output
from .test_mlfq import mlfq
from .test_properties import Arrival, SimClock, arrivals

# Recompute is expensive (1 s per token) and swaps cheap, so swapping is always preferred.
SLOW_PREFILL = PerformanceProfile(prefill_s=((1, 1.0), (2048, 2048.0)), decode_s=((1, 0.01),))


def make_core(kv_policy: str, num_blocks: int, clock, **overrides) -> SchedulerCore:
    values = dict(
        num_blocks=num_blocks, block_size=4, max_model_len=256, max_batch_size=3,
        max_batched_tokens=24, kv_policy=kv_policy, swap_enabled=True, block_bytes=1024,
        reserve_blocks=min(2, num_blocks - 1),
    )  # fmt: skip
    values.update(overrides)
    return SchedulerCore(SchedulerConfig(**values), mlfq(), clock=clock, profile=SLOW_PREFILL)


def drive(core: SchedulerCore, worker: SimWorker, workload: list[Arrival], clock: SimClock):
    pending = sorted(enumerate(workload), key=lambda item: item[1].iteration)
    jobs, outputs, finished = {}, {}, []
    iteration = 0
    while pending or core.has_work():
        while pending and pending[0][1].iteration <= iteration:
            index, arrival = pending.pop(0)
            prompt = [10 + (index + k) % 50 for k in range(arrival.prompt_len)]
            job = Job(f"j{index}", prompt, arrival.max_tokens)
            (event,) = core.add_job(job)
            if event.kind is EventKind.QUEUED:  # REJECTED: could never fit
                jobs[job.job_id] = job
        decision = core.schedule()
        for move in decision.swap_in:  # the core allocated exactly the blocks it swapped out
            assert len(move.block_ids) == core.job(move.job_id).num_host_blocks
        clock.tick()
        sampled, done = worker.run(decision)
        for event in core.update(decision, sampled, done):
            outputs.setdefault(event.job_id, []).extend(event.token_ids)
            if event.kind is EventKind.FINISHED:
                finished.append(event.job_id)
        iteration += 1
        assert iteration < 5000, "did not drain"
    return jobs, outputs, finished


SETTINGS = property_settings(50)


@SETTINGS
@given(
    workload=arrivals,
    kv_policy=st.sampled_from(["proactive", "reactive", "recompute"]),
    num_blocks=st.integers(12, 30),
    swap_delay=st.integers(0, 3),
    fail_every=st.sampled_from([0, 0, 3, 7]),
)
def test_swaps_lose_nothing_and_outputs_stay_exact(
    workload, kv_policy, num_blocks, swap_delay, fail_every
):
    clock = SimClock()
    core = make_core(kv_policy, num_blocks, clock)
    worker = SimWorker(block_size=4, swap_delay=swap_delay, fail_every=fail_every)
    jobs, outputs, finished = drive(core, worker, workload, clock)
    assert sorted(finished) == sorted(jobs)
    for job_id, job in jobs.items():
        assert outputs[job_id] == reference_output(job), job_id
    stats = core.stats()
    assert stats.num_free_blocks == num_blocks and stats.num_swaps_in_flight == 0
    assert not worker.store  # every kvstore copy was released
    if kv_policy == "recompute":
        assert stats.counters.num_swapped_out_jobs == 0


def test_pressure_swaps_out_instead_of_recomputing_and_brings_jobs_back():
    clock = SimClock()
    core = make_core("reactive", 10, clock)
    worker = SimWorker(block_size=4)
    workload = [Arrival(0, 10, 20), Arrival(0, 10, 20), Arrival(0, 10, 20)]
    jobs, outputs, _ = drive(core, worker, workload, clock)
    stats = core.stats()
    assert stats.counters.num_swapped_out_jobs > 0 and stats.counters.num_swapped_in_jobs > 0
    assert stats.counters.num_recomputed_jobs == 0
    assert all(outputs[j] == reference_output(job) for j, job in jobs.items())


def test_short_contexts_are_recomputed_when_that_is_cheaper():
    fast_prefill = PerformanceProfile(prefill_s=((1, 1e-6), (2048, 1e-3)), decode_s=((1, 0.01),))
    costs = SwapCostModel(fast_prefill, block_bytes=1 << 20, bytes_per_s=1e9)
    assert not costs.prefer_swap(num_blocks=1, num_computed_tokens=4)
    slow = SwapCostModel(SLOW_PREFILL, block_bytes=1 << 20, bytes_per_s=1e9)
    assert slow.prefer_swap(num_blocks=1, num_computed_tokens=4)
    costs.observe(num_bytes=4_000_000, duration_s=0.006)  # measured 1 GB/s less latency
    assert 0.9e9 < costs.bytes_per_s < 1e9 + 1


def test_proactive_prefetches_the_next_job_before_it_is_needed():
    clock = SimClock()
    core = make_core("proactive", 12, clock, max_batch_size=1, reserve_blocks=1)
    worker = SimWorker(block_size=4)
    for i in range(3):
        core.add_job(Job(f"j{i}", list(range(10 + i, 22 + i)), 30))
    prefetched_early = False
    for _ in range(400):
        if not core.has_work():
            break
        decision = core.schedule()
        running = {c.job_id for c in decision.chunks}
        prefetched_early |= any(m.job_id not in running for m in decision.swap_in)
        clock.tick()
        sampled, done = worker.run(decision)
        core.update(decision, sampled, done)
    assert core.counters.num_swapped_in_jobs > 0
    assert prefetched_early  # a swap-in started while another job ran


def test_a_failed_swap_in_falls_back_to_recompute():
    clock = SimClock()
    core = make_core("reactive", 10, clock)
    worker = SimWorker(block_size=4, fail_every=1)  # every swap fails
    workload = [Arrival(0, 10, 20), Arrival(0, 10, 20), Arrival(0, 10, 20)]
    jobs, outputs, _ = drive(core, worker, workload, clock)
    stats = core.stats()
    assert stats.counters.num_swap_failures > 0 and stats.counters.num_recomputed_jobs > 0
    assert all(outputs[j] == reference_output(job) for j, job in jobs.items())
    assert all(job.kv_state is KvState.NONE or job.is_finished for job in jobs.values())
