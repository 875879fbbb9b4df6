"""The Gittins-index bound of the simulator: the index on distributions whose best order is known,
and the policy's ordering. Pure; no processes."""

from __future__ import annotations

import statistics

import pytest

from bench import simulate, workload
from bench.gittins import GittinsPolicy, gittins_indices
from services.scheduler.core.job import Job


def test_equal_lengths_favour_the_oldest_job() -> None:
    """Every job is 10 tokens: the closer to its end, the sooner a job pays off (FCFS)."""
    indices = gittins_indices([10] * 5, weighted=False)
    assert len(indices) == 10
    assert indices == pytest.approx([1 / (10 - age) for age in range(10)])


def test_a_short_and_a_long_mode_send_jobs_past_the_short_mode_back() -> None:
    """Half the jobs are 2 tokens, half 50: a job one token from the short mode goes first, a
    new job next, and one past the short mode is long and waits behind both (least attained
    service first, once past the mode)."""
    indices = gittins_indices([2, 50] * 10, weighted=False)
    assert indices[0] == pytest.approx(0.5 / (1 + 1))  # b = 2: half finish in 2 tokens of each
    assert indices[1] == pytest.approx(0.5 / 1)  # one more token finishes half
    assert indices[2] == pytest.approx(1 / 48)
    assert indices[1] > indices[0] > indices[2]


def test_geometric_lengths_have_a_flat_index() -> None:
    """A memoryless distribution: every age is alike, the index is the hazard rate."""
    lengths = [s for s in range(1, 200) for _ in range(round(10_000 * 0.9 ** (s - 1)))]
    indices = gittins_indices(lengths, weighted=False)
    assert indices[:50] == pytest.approx([0.1] * 50, rel=0.05)


def test_weighting_by_one_over_length_favours_short_jobs_more() -> None:
    lengths = [1, 4]
    plain, weighted = gittins_indices(lengths, weighted=False), gittins_indices(lengths)
    # From age 0: one token finishes half the jobs (rate 0.5); four finish all in 2.5 tokens.
    assert plain[0] == pytest.approx(0.5)
    # Weighted: the 1-token job is worth 1, the 4-token job 1/4.
    assert weighted[0] == pytest.approx(0.5 * 1 / 1)
    assert weighted[1] == pytest.approx(0.5 * 0.25 / (0.5 * 3))
    with pytest.raises(ValueError, match=">= 1"):
        gittins_indices([0, 3])


def test_policy_orders_by_index_of_age_ties_by_arrival() -> None:
    policy = GittinsPolicy([0.5, 0.1, 0.9])
    jobs = [Job(f"j{i}", [1], 10) for i in range(4)]
    for job in jobs:
        policy.add(job, 0.0)
    jobs[1].output_token_ids = [7]  # age 1: 0.1
    jobs[2].output_token_ids = [7, 7]  # age 2: 0.9
    jobs[3].output_token_ids = [7] * 8  # past the table: the last index, 0.9
    assert [j.job_id for j in policy.order(0.0)] == ["j2", "j3", "j0", "j1"]
    policy.remove(jobs[2])
    assert [j.job_id for j in policy.order(0.0)] == ["j3", "j0", "j1"]


def test_simulator_runs_gittins_between_fcfs_and_the_oracle() -> None:
    """On a short-and-long mix under load, knowing the distribution beats fcfs; knowing each
    length (the oracle) is at least as good."""
    requests = [workload.Request(0.2 * i, "a " * 4, 40 if i % 3 == 0 else 3) for i in range(30)]
    indices = gittins_indices(r.output_tokens for r in requests)

    def mean(policy: str) -> float:
        outcome = simulate.simulate(
            requests, policy, {}, simulate.CostModel(0.05, 0.002, 0.004, 0.0),
            max_model_len=2048, max_batch_size=2, gittins=indices,
        )  # fmt: skip
        assert len(outcome.per_token_s) == len(requests)
        return statistics.mean(outcome.per_token_s)

    fcfs, gittins, oracle = mean("fcfs"), mean("gittins"), mean("srpt-oracle")
    assert gittins < 0.8 * fcfs
    assert oracle <= gittins * 1.05
