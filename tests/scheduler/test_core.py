"""The scheduler's pure core, driven through factories: no processes, no model."""

from collections import defaultdict

import pytest

from services.scheduler.core import EventKind, FinishReason, Job
from services.scheduler.core.job import SamplingParams

from .factories import STOP_TOKEN, fake_model, make_jobs, make_scheduler, run_until_idle


def outputs_of(history) -> dict[str, list[int]]:
    out = defaultdict(list)
    for _, events in history:
        for event in events:
            out[event.job_id].extend(event.token_ids)
    return dict(out)


def finish_reasons(history) -> dict[str, FinishReason]:
    return {
        e.job_id: e.finish_reason
        for _, events in history
        for e in events
        if e.kind is EventKind.FINISHED
    }


def reference_output(job: Job) -> list[int]:
    tokens = list(job.prompt_token_ids)
    out = []
    for _ in range(job.max_tokens):
        out.append(fake_model(tokens + out))
    return out


def test_job_prefills_then_decodes_to_max_tokens_and_frees_blocks():
    core = make_scheduler()
    (job,) = make_jobs(1, prompt_len=6, max_tokens=5)
    events = core.add_job(job)
    assert [e.kind for e in events] == [EventKind.QUEUED]
    history = run_until_idle(core)
    first = history[0][0]
    assert first.chunks[0].token_ids == job.prompt_token_ids and first.chunks[0].sample
    assert all(len(d.chunks[0].token_ids) == 1 for d, _ in history[1:] if d.chunks)
    assert outputs_of(history)["j0"] == reference_output(job)
    assert finish_reasons(history) == {"j0": FinishReason.LENGTH}
    assert core.blocks.num_free_blocks == core.blocks.num_blocks
    # The worker is told to release the finished job's blocks in the next decision.
    assert history[-1][0].free_job_ids == ["j0"] and not history[-1][0].chunks


def test_stop_token_finishes_unless_ignore_eos():
    def model_emitting_stop(tokens):
        return STOP_TOKEN

    core = make_scheduler()
    stopping = Job("a", [5, 6, 7], max_tokens=8, stop_token_ids=frozenset({STOP_TOKEN}))
    ignoring = Job(
        "b", [5, 6, 7], max_tokens=3, stop_token_ids=frozenset({STOP_TOKEN}), ignore_eos=True
    )
    core.add_job(stopping)
    core.add_job(ignoring)
    history = run_until_idle(core, model=model_emitting_stop)
    assert outputs_of(history) == {"a": [STOP_TOKEN], "b": [STOP_TOKEN] * 3}
    assert finish_reasons(history) == {"a": FinishReason.STOP, "b": FinishReason.LENGTH}


def test_batch_size_cap_and_fcfs_order():
    core = make_scheduler(max_batch_size=3)
    jobs = make_jobs(5, max_tokens=6)
    for job in jobs:
        core.add_job(job)
    history = run_until_idle(core)
    assert [c.job_id for c in history[0][0].chunks] == ["j0", "j1", "j2"]
    assert all(len(d.chunks) <= 3 for d, _ in history)
    # Run to completion: j3 starts only after an earlier job finished.
    first_j3 = next(i for i, (d, _) in enumerate(history) if "j3" in {c.job_id for c in d.chunks})
    first_finish = next(
        i for i, (_, ev) in enumerate(history) if any(e.kind is EventKind.FINISHED for e in ev)
    )
    assert first_j3 > first_finish


def test_token_budget_chunks_a_long_prompt_and_samples_only_at_its_end():
    core = make_scheduler(max_batched_tokens=8, max_batch_size=4)
    (job,) = make_jobs(1, prompt_len=20, max_tokens=2)
    core.add_job(job)
    history = run_until_idle(core)
    chunks = [d.chunks[0] for d, _ in history if d.chunks]
    assert [len(c.token_ids) for c in chunks[:3]] == [8, 8, 4]
    assert [c.sample for c in chunks[:3]] == [False, False, True]
    assert [c.start_pos for c in chunks[:3]] == [0, 8, 16]
    assert outputs_of(history)["j0"] == reference_output(job)


def test_every_decision_respects_limits_and_block_tables_are_disjoint():
    core = make_scheduler(num_blocks=40, block_size=4, max_batched_tokens=16, max_batch_size=4)
    for job in make_jobs(10, prompt_len=lambda i: 3 + 5 * i % 17, max_tokens=7):
        core.add_job(job)
    history = run_until_idle(core)
    for decision, _ in history:
        assert decision.num_tokens <= 16 and len(decision.chunks) <= 4
        seen: set[int] = set()
        for chunk in decision.chunks:
            assert len(chunk.block_ids) * 4 >= chunk.start_pos + len(chunk.token_ids)
            assert seen.isdisjoint(chunk.block_ids)
            seen.update(chunk.block_ids)


def test_block_pressure_preempts_by_recompute_and_outputs_stay_exact():
    # 12 blocks of 4 tokens: not enough for all jobs at once, so later jobs are evicted.
    core = make_scheduler(num_blocks=12, block_size=4, max_batch_size=4)
    jobs = make_jobs(6, prompt_len=lambda i: 4 + i, max_tokens=12)
    for job in jobs:
        core.add_job(job)
    history = run_until_idle(core)
    assert core.counters.num_recomputed_jobs > 0
    assert outputs_of(history) == {job.job_id: reference_output(job) for job in jobs}
    assert core.blocks.num_free_blocks == 12
    kinds = [e.kind for _, events in history for e in events]
    decision_events = [e.kind for d, _ in history for e in d.events]
    assert EventKind.PREEMPTED in decision_events and EventKind.RESUMED in decision_events
    assert kinds.count(EventKind.FINISHED) == 6


def test_a_job_never_evicts_a_job_ahead_of_it():
    core = make_scheduler(num_blocks=4, block_size=4, max_batch_size=4)
    first, second = make_jobs(2, prompt_len=8, max_tokens=8)
    core.add_job(first)
    core.add_job(second)
    history = run_until_idle(core)
    assert first.num_preemptions == 0
    assert second.num_preemptions == 1  # evicted once by the job ahead, then waited its turn
    assert outputs_of(history) == {j.job_id: reference_output(j) for j in (first, second)}


def test_admission_rejects_what_can_never_run_naming_the_field():
    core = make_scheduler(max_model_len=32, num_blocks=64)
    (too_long,) = make_jobs(1, prompt_len=30, max_tokens=5)
    (event,) = core.add_job(too_long)
    assert event.kind is EventKind.REJECTED and event.error.startswith("max_tokens")
    small = make_scheduler(num_blocks=2, block_size=4, max_model_len=256)
    (event,) = small.add_job(make_jobs(1, prompt_len=6, max_tokens=5)[0])
    assert event.kind is EventKind.REJECTED and "KV cache" in event.error
    assert small.counters.num_rejected_jobs == 1 and small.num_jobs == 0


def test_cancel_frees_blocks_and_tells_the_worker():
    core = make_scheduler()
    a, b = make_jobs(2, prompt_len=9, max_tokens=50)
    core.add_job(a)
    core.add_job(b)
    decision = core.schedule()
    core.update(decision, {c.job_id: 5 for c in decision.chunks})
    used = core.blocks.num_used_blocks
    (event,) = core.cancel(a.job_id)
    assert event.finish_reason is FinishReason.CANCELLED
    assert core.blocks.num_used_blocks == used - 3
    assert core.schedule().free_job_ids == [a.job_id]
    assert core.cancel(a.job_id) == []


def test_duplicate_job_id_is_rejected():
    core = make_scheduler()
    core.add_job(make_jobs(1)[0])
    (event,) = core.add_job(make_jobs(1)[0])
    assert event.kind is EventKind.REJECTED and "job_id" in event.error


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("temperature", {"temperature": -1}), ("top_p", {"top_p": 0}), ("top_k", {"top_k": -2})],
)
def test_sampling_params_validate(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_stats_count_running_and_waiting():
    core = make_scheduler(max_batch_size=2)
    for job in make_jobs(5, max_tokens=3):
        core.add_job(job)
    core.schedule()
    stats = core.stats()
    assert (stats.num_running_jobs, stats.num_waiting_jobs) == (2, 3)
    assert stats.num_free_blocks == 64 - 4
