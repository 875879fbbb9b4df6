"""The simulator drives the real scheduler core with a cost model. No processes."""

from __future__ import annotations

import statistics

import pytest

from bench import simulate, workload
from bench.simulate import CostModel
from bench.variants import parse_variant
from bench.workload import Request

COST = CostModel(base_s=0.05, per_decode_s=0.002, per_prefill_token_s=0.004, per_context_token_s=0)


def test_every_request_finishes_no_sooner_than_its_own_work() -> None:
    requests = workload.make_workload(40, 5.0, dataset="alpaca", scale=0.5, seed=3)
    for policy in ("fcfs", "skip-join-mlfq", "mlfq", "srpt-oracle"):
        outcome = simulate.simulate(requests, policy, {}, COST, max_model_len=2048)
        assert len(outcome.per_token_s) == len(requests)
        # A job needs at least one lone iteration per output token.
        assert min(outcome.per_token_s) >= COST.base_s + COST.per_decode_s - 1e-9
        assert outcome.makespan_s >= max(r.arrival_s for r in requests)


def test_head_of_line_blocking_is_what_preemption_removes() -> None:
    """One long job, then short ones, one batch slot: under fcfs the short jobs wait for all
    of it; under skip-join MLFQ they go ahead at the next token."""
    requests = [Request(0.0, "a " * 8, 400)] + [
        Request(0.5 + 0.3 * i, "b " * 8, 4) for i in range(10)
    ]

    def short_mean(policy: str) -> float:
        outcome = simulate.simulate(
            requests, policy, {}, COST, max_model_len=2048, max_batch_size=1
        )
        return statistics.mean(outcome.per_token_s[1:])

    fcfs, mlfq = short_mean("fcfs"), short_mean("skip-join-mlfq")
    assert fcfs > 5 * mlfq
    assert short_mean("srpt-oracle") == pytest.approx(mlfq, rel=0.5)


def test_cost_model_profile_matches_its_own_iterations() -> None:
    profile = COST.profile(max_batch_size=16)
    assert profile.decode_time(1) == pytest.approx(COST.base_s + COST.per_decode_s)
    assert profile.decode_time(16) == pytest.approx(COST.base_s + 16 * COST.per_decode_s)
    assert profile.prefill_time(64) == pytest.approx(COST.base_s + 64 * COST.per_prefill_token_s)


def test_under_memory_pressure_swapping_wins_and_mlfq_does_not_thrash() -> None:
    """A pool of 25 blocks for a 16-wide batch. Swapping beats recomputing the preempted jobs
    (the simulator charges swaps their copy time), and skip-join MLFQ with recompute beats fcfs
    with recompute: arrivals wait for free blocks instead of dropping the KV of the jobs they
    outrank (before that rule it was 2.5-5x slower), and demoted jobs do not count as starving
    after a normal wait (with the old 5 s threshold they did, and dropped others' KV)."""
    cost, max_model_len = simulate.MODELS["smollm2"]
    requests = workload.make_workload(40, 4.0, dataset="sharegpt", scale=0.1, seed=0)

    def mean(policy: str, kv_policy: str, **options: str) -> float:
        outcome = simulate.simulate(
            requests, policy, options, cost, max_model_len=max_model_len,
            num_blocks=25, kv_policy=kv_policy,
        )  # fmt: skip
        assert len(outcome.per_token_s) == len(requests)
        return statistics.mean(outcome.per_token_s)

    mlfq_recompute = mean("skip-join-mlfq", "recompute")
    assert mlfq_recompute > 1.1 * mean("skip-join-mlfq", "proactive")
    assert mlfq_recompute < 0.9 * mean("fcfs", "recompute")
    assert mean("skip-join-mlfq", "recompute", starvation_s="5") > 1.1 * mlfq_recompute


def test_starvation_promotion_does_not_turn_sustained_overload_into_fcfs() -> None:
    """150 requests at 3 req/s on a 25-block pool: arrivals outpace completions for the whole
    run, so demoted jobs wait longer and longer. The default threshold (1000 full-batch
    iterations, 93 s here) keeps skip-join MLFQ well ahead of fcfs; the earlier 200 iterations
    (18.5 s) promoted the backlog ahead of every arrival and fell back to fcfs's latency."""
    cost, max_model_len = simulate.MODELS["smollm2"]
    requests = workload.make_workload(150, 3.0, dataset="sharegpt", scale=0.1, seed=0)

    def mean(policy: str, **options: str) -> float:
        outcome = simulate.simulate(
            requests, policy, options, cost, max_model_len=max_model_len,
            num_blocks=25, kv_policy="recompute",
        )  # fmt: skip
        return statistics.mean(outcome.per_token_s)

    fcfs = mean("fcfs")
    assert fcfs > 1.3 * mean("skip-join-mlfq")
    assert fcfs < 1.2 * mean("skip-join-mlfq", starvation_s="18.5")


def test_the_knee_is_the_lowest_rate_where_the_baseline_reaches_the_factor() -> None:
    """find_knee applies issue 3's measure per seed: unloaded latency from eight requests
    served one at a time, then the first rate (in the order given) at 5x or more."""
    variants = [parse_variant("fcfs"), parse_variant("skip-join-mlfq")]
    rates = [1.0, 2.0, 4.0, 8.0]

    def make_requests(rate: float) -> list[Request]:
        return workload.make_workload(40, rate, dataset="sharegpt", scale=0.1, seed=1)

    def run(requests: list[Request], variant) -> simulate.Outcome:
        return simulate.simulate(
            requests, variant.policy, {}, COST, max_model_len=2048, num_blocks=20
        )

    knee = simulate.find_knee(run, make_requests, variants, rates, factor=5.0, seed=1)
    assert knee is not None
    unloaded = statistics.mean(run(make_requests(0.001)[:8], variants[0]).per_token_s)
    fcfs = {
        rate: statistics.mean(run(make_requests(rate), variants[0]).per_token_s) for rate in rates
    }
    assert fcfs[knee.rate] >= 5 * unloaded
    assert all(fcfs[rate] < 5 * unloaded for rate in rates[: rates.index(knee.rate)])
    assert knee.rate > rates[0]  # the lowest rate is not overload: the test means something
    assert knee.baseline_over_unloaded == pytest.approx(fcfs[knee.rate] / unloaded)
    mlfq = run(make_requests(knee.rate), variants[1]).per_token_s
    assert knee.ratios["skip-join-mlfq"][0] == pytest.approx(
        fcfs[knee.rate] / statistics.mean(mlfq)
    )
    assert simulate.find_knee(run, make_requests, variants, rates, factor=1e6, seed=1) is None
