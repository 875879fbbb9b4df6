"""Automatic prefix caching in the pure core: full blocks named by a hash chain, shared by
reference, cached when nobody holds them and evicted least recently released first. The fake
model reads each job's history out of its blocks (SimWorker), so a block shared wrongly, written
while shared, or evicted while referenced changes some job's output."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.core import EventKind, Job, SchedulerConfig, SchedulerCore
from services.scheduler.core.block_manager import BlockManager

from .factories import SimWorker, property_settings
from .test_core import reference_output
from .test_mlfq import mlfq
from .test_properties import SimClock

BLOCK = 4


def make_core(num_blocks: int = 64, prefix_caching: bool = True, **overrides) -> SchedulerCore:
    values = dict(
        num_blocks=num_blocks, block_size=BLOCK, max_model_len=256, max_batch_size=4,
        max_batched_tokens=64, prefix_caching=prefix_caching,
    )  # fmt: skip
    values.update(overrides)
    return SchedulerCore(SchedulerConfig(**values), mlfq(), clock=SimClock())


def check_blocks(core: SchedulerCore) -> None:
    """Every block a job holds is referenced once per table that holds it and is not free to
    evict; a job's last, partial block is its own; nothing is referenced that no job holds."""
    blocks = core.blocks
    held = Counter(b for job_id in core.job_ids() for b in core.job(job_id).block_ids)
    for block_id in range(blocks.num_blocks):
        assert blocks.refs(block_id) == held[block_id], block_id
    assert blocks.num_free_blocks == blocks.num_blocks - len(held)
    for job_id in core.job_ids():
        job = core.job(job_id)
        if job.block_ids and job.num_computed_tokens % BLOCK:
            assert blocks.refs(job.block_ids[-1]) == 1, f"{job_id} shares its partial block"


def drive(core, worker, jobs_at: dict[int, list[Job]], check=True, cancel=()):
    """Runs until idle; jobs_at[i] arrive before iteration i. Returns outputs and events."""
    outputs: dict[str, list[int]] = {}
    finished: dict[str, object] = {}
    iteration = 0
    while any(k >= iteration for k in jobs_at) or core.has_work():
        for job in jobs_at.get(iteration, []):
            (event,) = core.add_job(job)
            assert event.kind is EventKind.QUEUED, event
        if iteration in cancel:
            for job_id in core.job_ids()[:1]:
                core.cancel(job_id)
                finished[job_id] = None
        decision = core.schedule()
        sampled, done = worker.run(decision)
        for event in core.update(decision, sampled, done):
            outputs.setdefault(event.job_id, []).extend(event.token_ids)
            if event.kind is EventKind.FINISHED:
                finished[event.job_id] = event
        if check:
            check_blocks(core)
        iteration += 1
        assert iteration < 5000, "did not drain"
    return outputs, finished


def prompt(shared: int, job: int, extra: int) -> list[int]:
    """`shared` tokens every job has in common, then `extra` tokens of this job's own."""
    return [10 + k % 50 for k in range(shared)] + [60 + job * 7 + k for k in range(extra)]


def test_the_hash_names_a_block_by_its_tokens_and_everything_before():
    blocks = BlockManager(8, BLOCK, prefix_caching=True, salt="model")
    a = Job("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], 1)
    b = Job("b", [1, 2, 3, 4, 5, 6, 7, 8, 0], 1)
    c = Job("c", [9, 2, 3, 4, 5, 6, 7, 8, 9], 1)
    assert blocks.block_hashes(a, 2) == blocks.block_hashes(b, 2)
    assert blocks.block_hashes(a, 2)[1] != blocks.block_hashes(c, 2)[1]  # same tokens, other past
    other_model = BlockManager(8, BLOCK, prefix_caching=True, salt="other")
    assert blocks.block_hashes(a, 1) != other_model.block_hashes(Job("a", a.prompt_token_ids, 1), 1)


def test_a_released_block_stays_cached_and_is_evicted_least_recent_first():
    blocks = BlockManager(4, BLOCK, prefix_caching=True)
    jobs = [Job(f"j{i}", [i] * 8 + [99], 1) for i in range(2)]
    for job in jobs:
        blocks.allocate(job, 8)
        job.num_computed_tokens = 8
        blocks.register(job)
    assert blocks.num_free_blocks == 0 and blocks.num_cached_blocks == 4
    for job in jobs:
        blocks.free(job)  # j0 first: its blocks are the least recent
    assert blocks.num_free_blocks == 4 and blocks.num_cached_blocks == 4
    again = [Job(f"k{i}", [i] * 8 + [5], 1) for i in range(2)]
    assert len(blocks.cached_prefix(again[1])) == 2
    newcomer = Job("n", [7] * 5, 1)
    blocks.allocate(newcomer, 5)  # takes two blocks: j0's, the least recently released
    assert blocks.cached_prefix(again[0]) == []
    assert len(blocks.cached_prefix(again[1])) == 2


def test_a_referenced_block_is_never_handed_out():
    blocks = BlockManager(3, BLOCK, prefix_caching=True)
    first = Job("a", [1] * 8 + [2], 1)
    blocks.allocate(first, 8)
    first.num_computed_tokens = 8
    blocks.register(first)
    second = Job("b", [1] * 8 + [3], 1)
    prefix = blocks.cached_prefix(second)
    blocks.share(second, prefix)
    blocks.free(first)
    assert [blocks.refs(b) for b in prefix] == [1, 1]
    assert blocks.num_free_blocks == 1
    third = Job("c", [4] * 4, 1)
    blocks.allocate(third, 4)
    assert set(third.block_ids).isdisjoint(prefix)


def test_shared_prefixes_of_0_1_many_and_all_but_one_blocks_keep_outputs_exact():
    for shared_blocks in (0, 1, 5, 9):
        shared = shared_blocks * BLOCK
        # All but one: the prompt is the shared part plus one more token.
        extras = [1, 3, 6] if shared_blocks != 9 else [1, 1, 1]
        together = {0: [Job(f"t{i}", prompt(shared, i, e), 6) for i, e in enumerate(extras)]}
        apart = {10 * i: [Job(f"a{i}", prompt(shared, i, e), 6)] for i, e in enumerate(extras)}
        for jobs_at in (together, apart):
            core = make_core()
            outputs, _ = drive(core, SimWorker(BLOCK), jobs_at)
            for jobs in jobs_at.values():
                for job in jobs:
                    assert outputs[job.job_id] == reference_output(job), (shared_blocks, job)
            hits = core.counters.num_prefix_hit_tokens
            if jobs_at is apart and shared_blocks:
                # Every later job finds the shared blocks (all full blocks before its last token).
                expected = sum(
                    min(shared, (len(job.prompt_token_ids) - 1) // BLOCK * BLOCK)
                    for i, jobs in jobs_at.items()
                    if i
                    for job in jobs
                )
                assert hits == expected, (shared_blocks, hits, expected)
            if not shared_blocks:
                assert hits == 0
            assert core.blocks.num_free_blocks == core.config.num_blocks


def test_a_finished_jobs_usage_reports_its_cached_prompt_tokens():
    core = make_core()
    first = Job("first", prompt(16, 0, 2), 3)
    second = Job("second", prompt(16, 1, 2), 3)
    _, finished = drive(core, SimWorker(BLOCK), {0: [first], 8: [second]})
    assert finished["first"].num_cached_tokens == 0
    assert finished["second"].num_cached_tokens == 16


def test_skip_join_places_a_mostly_cached_prompt_by_its_uncached_part():
    core = make_core(max_model_len=4096, num_blocks=1200, max_batched_tokens=4096)
    long = Job("long", prompt(2000, 0, 4), 2)
    drive(core, SimWorker(BLOCK), {0: [long]}, check=False)
    cached = Job("cached", prompt(2000, 1, 100), 2)
    short = Job("short", prompt(0, 2, 104), 2)
    fresh = Job("fresh", prompt(0, 3, 2100), 2)
    levels = {job.job_id: core.add_job(job)[0].queue_level for job in (cached, short, fresh)}
    assert cached.num_cached_tokens == 2000
    assert levels["cached"] == levels["short"] < levels["fresh"]


def test_without_prefix_caching_nothing_is_shared():
    core = make_core(prefix_caching=False)
    jobs = {0: [Job("a", prompt(16, 0, 2), 4)], 5: [Job("b", prompt(16, 1, 2), 4)]}
    outputs, finished = drive(core, SimWorker(BLOCK), jobs)
    assert outputs["b"] == reference_output(jobs[5][0])
    assert core.counters.num_prefix_hit_tokens == 0 and core.blocks.num_cached_blocks == 0
    assert finished["b"].num_cached_tokens == 0


@dataclass(frozen=True)
class Arrival:
    iteration: int
    prefix: int  # which of a few shared prefixes
    shared_len: int
    extra: int
    max_tokens: int


arrivals = st.lists(
    st.builds(
        Arrival,
        iteration=st.integers(0, 30),
        prefix=st.integers(0, 2),
        shared_len=st.integers(0, 24),
        extra=st.integers(1, 9),
        max_tokens=st.integers(1, 12),
    ),
    min_size=1,
    max_size=12,
)


@property_settings(60)
@given(
    workload=arrivals,
    kv_policy=st.sampled_from(["recompute", "proactive", "reactive"]),
    num_blocks=st.integers(10, 40),
    swap_delay=st.integers(0, 2),
    fail_every=st.sampled_from([0, 0, 3]),
    cancel_at=st.sets(st.integers(0, 40), max_size=4),
)
def test_caching_never_changes_an_output_nor_leaks_a_block(
    workload, kv_policy, num_blocks, swap_delay, fail_every, cancel_at
):
    """Reference counts match the tables at every iteration (never negative: BlockManager
    raises), no referenced block is free, outputs equal the uncached reference, and a cancel
    storm leaves every block free."""
    core = make_core(
        num_blocks, kv_policy=kv_policy, swap_enabled=True, block_bytes=1024, max_batch_size=3,
        max_batched_tokens=24, reserve_blocks=min(2, num_blocks - 1),
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
    assert all(core.blocks.refs(b) == 0 for b in range(num_blocks))
