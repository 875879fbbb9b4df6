"""Skip-join MLFQ and the other policies, as pure code (no processes)."""

from __future__ import annotations

import pytest

from services.scheduler.core import EventKind, Job
from services.scheduler.core.baselines import FcfsPolicy, SrptOraclePolicy
from services.scheduler.core.mlfq import MlfqOptions, MlfqPolicy
from services.scheduler.core.policies import make_policy
from services.scheduler.core.profile import SYNTHETIC_PROFILE, PerformanceProfile

from .factories import make_jobs, make_scheduler, run_iteration


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def mlfq(**overrides) -> MlfqPolicy:
    # q0 = 20 ms covers a short prompt's prefill in SYNTHETIC_PROFILE (10 ms + 1 ms / 16 tokens).
    values = dict(base_quantum_s=0.02, quantum_ratio=2.0, num_queues=6, starvation_s=1.0)
    values.update(overrides)
    return MlfqPolicy(MlfqOptions(**values), SYNTHETIC_PROFILE, "skip-join-mlfq")


def job(job_id: str, prompt_len: int = 4, max_tokens: int = 8) -> Job:
    return Job(job_id, list(range(10, 10 + prompt_len)), max_tokens)


def test_make_policy_by_name_and_options():
    assert isinstance(make_policy("fcfs"), FcfsPolicy)
    assert isinstance(make_policy("srpt-oracle"), SrptOraclePolicy)
    policy = make_policy("skip-join-mlfq", {"charge": "whole", "num_queues": "5"})
    assert isinstance(policy, MlfqPolicy)
    assert policy.options.charge == "whole" and policy.options.num_queues == 5
    assert make_policy("mlfq").options.skip_join is False
    with pytest.raises(ValueError, match="unknown MLFQ option"):
        make_policy("mlfq", {"bogus": "1"})
    with pytest.raises(ValueError, match="charge"):
        make_policy("mlfq", {"charge": "sometimes"})
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lottery")


def test_defaults_come_from_the_profile():
    profile = PerformanceProfile(
        prefill_s=((1, 0.02), (1024, 0.5)), decode_s=((1, 0.02), (16, 0.015))
    )
    options = MlfqOptions.from_profile(profile, max_model_len=1024, max_batch_size=16)
    assert options.base_quantum_s == pytest.approx(0.02)  # one lone decode iteration
    # The last quantum covers the longest job alone: a full prefill, then decoding to the end.
    assert options.quanta[-1] >= 0.5 + 1024 * 0.02
    assert options.quanta[-2] < 0.5 + 1024 * 0.02  # and no more queues than that needs
    tiny = MlfqOptions.from_profile(
        PerformanceProfile(prefill_s=((1, 1e-3), (512, 5e-3)), decode_s=((1, 1e-3),)),
        max_model_len=512,
        max_batch_size=1,
    )
    assert tiny.num_queues == 11  # 1 ms .. 1.02 s: not 4 queues ending at 8 ms
    assert options.starvation_s == pytest.approx(1000 * 0.015)
    # A slow engine gets a proportionally long threshold (it was capped at 5 s), a fast one 0.5 s.
    slow = PerformanceProfile(prefill_s=((1, 0.05),), decode_s=((1, 0.05), (16, 0.09)))
    assert MlfqOptions.from_profile(slow, 1024, 16).starvation_s == pytest.approx(90.0)
    fast = PerformanceProfile(prefill_s=((1, 1e-4),), decode_s=((1, 1e-4), (16, 2e-4)))
    assert MlfqOptions.from_profile(fast, 1024, 16).starvation_s == 0.5


def test_skip_join_places_long_prompts_lower():
    policy = mlfq()
    short, long = job("s", prompt_len=4), job("l", prompt_len=1500)
    assert policy.add(short, 0.0) == 0
    # prefill(1500) = 0.010 + 1500/16 ms = 103.75 ms -> first quantum >= it is 0.02 * 2^3.
    assert policy.add(long, 0.0) == 3
    assert mlfq(skip_join=False).add(job("x", prompt_len=1500), 0.0) == 0


def test_new_short_job_preempts_a_demoted_long_one_at_the_next_token():
    clock = SimClock()
    core = make_scheduler(policy=mlfq(), max_batch_size=1, clock=clock)
    (long,) = make_jobs(1, prompt_len=4, max_tokens=200)
    core.add_job(long)

    def tick():
        clock.now += 0.01

    for _ in range(25):  # the long job runs alone and sinks through the queues
        run_iteration(core, between=tick)
    # 0.25 s of service: past q0 + q1 + q2 (0.02 + 0.04 + 0.08 s), not past q3 (0.16 s) too.
    assert core.policy.level(long) == 3
    short = Job("short", [5, 6, 7], max_tokens=3)
    core.add_job(short)
    decision, _ = run_iteration(core)
    assert [c.job_id for c in decision.chunks] == ["short"]
    assert [e.kind for e in decision.events] == [EventKind.PREEMPTED]
    runs = [run_iteration(core, between=tick)[0] for _ in range(3)]
    # The short job finishes (prefill + 2 decodes) before the long one resumes.
    assert [[c.job_id for c in d.chunks] for d in runs] == [["short"], ["short"], [long.job_id]]
    assert [e.kind for e in runs[-1].events] == [EventKind.RESUMED]
    assert long.block_ids  # it kept its KV blocks while preempted


def test_share_charging_does_not_charge_a_decode_for_a_batched_prefill():
    shared, whole = mlfq(), mlfq(charge="whole")
    for policy in (shared, whole):
        decode, prefill = job("d"), job("p", prompt_len=1000)
        policy.add(decode, 0.0)
        policy.add(prefill, 0.0)
        policy.on_iteration([(decode, 1), (prefill, 1000)], 0.08, 0.08)
    assert whole.level(job("d")) == 2  # charged the whole 80 ms prefill iteration
    assert shared.level(job("d")) == 0  # charged its own small share


def test_srpt_oracle_orders_by_remaining_work():
    policy = SrptOraclePolicy(SYNTHETIC_PROFILE)
    jobs = [job("a", max_tokens=50), job("b", max_tokens=5), job("c", max_tokens=20)]
    for j in jobs:
        policy.add(j, 0.0)
    assert [j.job_id for j in policy.order(0.0)] == ["b", "c", "a"]


def test_starving_job_goes_first_and_keeps_its_allowance():
    policy = mlfq(starvation_s=1.0)
    low = job("low", prompt_len=1500)
    policy.add(low, 0.0)
    level_before = policy.level(low)
    fresh = [job(f"f{i}") for i in range(3)]
    for f in fresh:
        policy.add(f, 1.5)
    order = policy.order(1.5)
    assert order[0].job_id == "low" and policy.level(low) == 0
    # One iteration of its prefill does not demote it again: it kept its old queue's allowance.
    policy.on_iteration([(low, 1500)], policy.quanta[level_before] * 0.9, 1.6)
    assert policy.level(low) == 0


def test_paper_starvation_puts_the_job_at_the_tail_of_q0():
    policy = mlfq(starvation_s=1.0, starvation="paper")
    low = job("low", prompt_len=1500)
    policy.add(low, 0.0)
    for i in range(3):
        policy.add(job(f"f{i}"), 1.5)
    order = policy.order(1.5)
    assert [j.job_id for j in order] == ["f0", "f1", "f2", "low"]
    assert policy.level(low) == 0


def test_backfill_off_stops_at_the_first_blocked_job():
    # 6 blocks of 4 tokens. "big" is ahead but cannot get 5 blocks while "small" holds 2.
    for backfill, expected in ((True, ["small2"]), (False, [])):
        core = make_scheduler(num_blocks=6, block_size=4, max_batch_size=4, backfill=backfill)
        core.add_job(Job("small", list(range(8)), max_tokens=1))
        decision, _ = run_iteration(core)
        core.add_job(Job("big", list(range(20)), max_tokens=1))
        core.add_job(Job("small2", list(range(4)), max_tokens=1))
        core.blocks.allocate(Job("pin", [1], max_tokens=1), 8)  # 2 blocks held elsewhere
        decision = core.schedule()
        assert decision.blocked_job_ids == ["big"]
        assert [c.job_id for c in decision.chunks] == expected
