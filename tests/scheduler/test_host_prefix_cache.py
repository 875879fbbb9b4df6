"""The prefix cache's host tier in the pure core: cached blocks evicted from the device pool are
kept in the kvstore under their name (a swap-out of a one-block "job" `prefix:<name>`), and a
job whose prefix is there reads it back instead of computing it, when that is cheaper. A lost
or refused copy only means the job computes the blocks. SimWorker's fake model reads each
job's history out of its blocks, so a block loaded wrongly (or into the wrong place, or read
before it landed) changes an output."""

from __future__ import annotations

from hypothesis import event as note_case
from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.core import Job
from services.scheduler.core.host_cache import HostPrefixCache, host_job_id, is_host_job

from .factories import SimWorker, property_settings
from .test_core import reference_output
from .test_prefix_cache import BLOCK, arrivals, drive, make_core, prompt


def make_host_core(num_blocks: int = 12, host_cache_blocks: int = 64, **overrides):
    values = dict(
        swap_enabled=True, block_bytes=1024, host_cache_blocks=host_cache_blocks,
        swap_cost_scale=0.0, reserve_blocks=0, kv_policy="reactive",
    )  # fmt: skip
    values.update(overrides)
    return make_core(num_blocks, **values)


def spilled_then_reused(core, worker):
    """`first` leaves 4 cached blocks; `filler` needs the whole pool, which pushes them to the
    kvstore; `second` shares first's prefix and arrives after both are done."""
    first = Job("first", prompt(16, 0, 2), 3)
    filler = Job("filler", prompt(0, 9, 40), 3)
    second = Job("second", prompt(16, 1, 2), 3)
    outputs, finished = drive(core, worker, {0: [first], 10: [filler], 25: [second]})
    return outputs, finished, second


def test_an_evicted_prefix_goes_to_the_kvstore_and_comes_back_for_the_next_job():
    core = make_host_core()
    worker = SimWorker(BLOCK, wipe=False)  # as a real pool, it keeps what it swaps out
    outputs, finished, second = spilled_then_reused(core, worker)
    assert outputs["second"] == reference_output(second)
    counters = core.counters
    assert counters.num_prefix_host_hit_tokens == 16
    assert counters.num_prefix_hit_tokens == 0  # not on the device any more
    assert finished["second"].num_cached_tokens == 16  # what its usage reports
    stored = {job_id for job_id in worker.store if is_host_job(job_id)}
    # What was loaded is freed; the spilled copies nobody loaded stay, as the index says.
    assert len(stored) == core.memory.host.num_stored == core.stats().num_host_cached_blocks
    assert core.blocks.num_free_blocks == core.config.num_blocks


def test_without_the_host_tier_the_evicted_prefix_is_computed_again():
    core = make_host_core(host_cache_blocks=0)
    worker = SimWorker(BLOCK, wipe=False)
    outputs, _, second = spilled_then_reused(core, worker)
    assert outputs["second"] == reference_output(second)
    assert core.counters.num_prefix_host_hit_tokens == 0
    assert not any(is_host_job(job_id) for job_id in worker.store)


def test_a_load_dearer_than_computing_is_not_made():
    core = make_host_core(swap_cost_scale=1e9)
    worker = SimWorker(BLOCK, wipe=False)
    outputs, _, second = spilled_then_reused(core, worker)
    assert outputs["second"] == reference_output(second)
    assert core.counters.num_prefix_host_hit_tokens == 0
    assert core.counters.num_swapped_in_jobs == 0


def test_a_lost_copy_means_the_job_computes_the_blocks():
    core = make_host_core()
    worker = SimWorker(BLOCK, wipe=False)
    first = Job("first", prompt(16, 0, 2), 3)
    filler = Job("filler", prompt(0, 9, 40), 3)
    drive(core, worker, {0: [first], 10: [filler]})
    assert core.memory.host.num_stored == 4
    worker.store.clear()  # the kvstore restarted
    second = Job("second", prompt(16, 1, 2), 3)
    outputs, _ = drive(core, worker, {0: [second]})
    assert outputs["second"] == reference_output(second)
    assert core.counters.num_swap_failures >= 1
    assert core.counters.num_prefix_host_hit_tokens == 0  # found, then lost: no hit
    # The lost copies are forgotten (the filler's blocks, evicted meanwhile, were kept).
    assert core.memory.host.find(core.blocks.block_hashes(second, 1)) == []
    assert core.blocks.num_free_blocks == core.config.num_blocks


def test_lost_workers_forget_the_host_tier():
    core = make_host_core()
    worker = SimWorker(BLOCK, wipe=False)
    spilled_then_reused(core, worker)
    assert core.memory.host.num_stored
    core.recompute_all()
    assert core.memory.host.num_stored == 0
    deletes = core.memory.take_pending_free()
    assert deletes and all(is_host_job(job_id) for job_id in deletes)


def test_the_host_index_is_bounded_and_evicts_least_recently_stored():
    cache = HostPrefixCache(capacity_blocks=2)
    names = [bytes([i]) * 16 for i in range(3)]
    for block_id, name in enumerate(names):
        move = cache.spill(name, block_id)
        assert move is not None and move.job_id == host_job_id(name)
        cache.spill_done(move.job_id, ok=True)
    assert cache.spill(names[2], 9) is None  # kept already
    assert cache.find(names[1:]) == names[1:]
    assert cache.find(names) == []  # the oldest went, and a prefix stops at the first gap
    assert cache.take_deletes() == [host_job_id(names[0])]


def test_a_cancelled_loading_job_frees_its_loads_before_its_blocks_are_reused():
    cache = HostPrefixCache(capacity_blocks=8)
    names = [bytes([i]) * 16 for i in range(2)]
    for block_id, name in enumerate(names):
        cache.spill_done(cache.spill(name, block_id).job_id, ok=True)
    host_ids = cache.start_load("job", names)
    assert cache.load_done(host_ids[0]) is False  # one of two landed
    cache.forget_job("job")  # cancelled: the load still writing is freed (the worker settles)
    assert cache.take_deletes() == host_ids
    assert cache.load_done(host_ids[1]) is False  # its result comes late: nothing more to do
    assert cache.take_deletes() == []


@property_settings(150)
@given(
    workload=arrivals,
    kv_policy=st.sampled_from(["recompute", "proactive", "reactive"]),
    num_blocks=st.integers(10, 30),
    host_cache_blocks=st.sampled_from([2, 8, 64]),
    swap_cost_scale=st.sampled_from([0.0, 1.0]),
    swap_delay=st.integers(0, 2),
    fail_every=st.sampled_from([0, 0, 3]),
    cancel_at=st.sets(st.integers(0, 40), max_size=4),
)
def test_the_host_tier_never_changes_an_output_nor_leaks(
    workload,
    kv_policy,
    num_blocks,
    host_cache_blocks,
    swap_cost_scale,
    swap_delay,
    fail_every,
    cancel_at,
):
    """Outputs equal the uncached reference; reference counts match the tables at every step;
    after a cancel storm every block is free, no load is pending and the kvstore holds exactly
    the copies the host index names."""
    core = make_host_core(
        num_blocks, host_cache_blocks, kv_policy=kv_policy, swap_cost_scale=swap_cost_scale,
        max_batch_size=3, max_batched_tokens=24, reserve_blocks=min(2, num_blocks - 1),
    )  # fmt: skip
    worker = SimWorker(BLOCK, swap_delay=swap_delay, fail_every=fail_every, wipe=False)
    jobs_at: dict[int, list[Job]] = {}
    for index, arrival in enumerate(workload):
        tokens = [100 * arrival.prefix + k for k in range(arrival.shared_len)]
        tokens += [7000 + index * 13 + k for k in range(arrival.extra)]
        job = Job(f"j{index}", tokens, arrival.max_tokens)
        if len(tokens) + arrival.max_tokens <= num_blocks * BLOCK:
            jobs_at.setdefault(arrival.iteration, []).append(job)
    outputs, finished = drive(core, worker, jobs_at, cancel=cancel_at)
    for jobs in jobs_at.values():
        for job in jobs:
            assert job.job_id in finished
            event = finished[job.job_id]
            if event is not None and event.finish_reason.value != "cancelled":
                assert outputs[job.job_id] == reference_output(job), job.job_id
    assert core.blocks.num_free_blocks == num_blocks
    host = core.memory.host
    note_case(f"loaded from the kvstore: {bool(core.counters.num_prefix_host_hit_tokens)}")
    assert not host._loading and not host._waiter
    for _ in range(4):  # the last spills report, and what they made redundant is freed
        core.apply_swaps(worker.run(core.schedule())[1])
    assert host.num_stored <= host_cache_blocks
    stored = {job_id for job_id in worker.store if is_host_job(job_id)}
    assert stored == {host_job_id(name) for name in host._stored}
