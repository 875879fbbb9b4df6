"""The restart budget: a rate of restarts with back-off, on a clock the test sets."""

from __future__ import annotations

import pytest

from services.restart_budget import RestartBudget, RestartPolicy

POLICY = RestartPolicy(
    max_restarts=5, window_s=60.0, first_backoff_s=1.0, max_backoff_s=30.0, stable_s=60.0
)


def test_deaths_spread_wider_than_the_window_allows_never_stop_the_stack():
    budget = RestartBudget(POLICY)
    for death in range(100):
        now = death * 13.0  # at most 5 in any 60 s
        verdict = budget.record_exit(now)
        assert verdict.restart, death
        budget.record_ready(now + 1.0)


def test_one_death_more_than_the_budget_within_the_window_is_a_crash_loop():
    budget = RestartBudget(POLICY)
    verdicts = []
    for now in (0.0, 5.0, 10.0, 15.0, 20.0, 25.0):
        verdicts.append(budget.record_exit(now))
        budget.record_ready(now + 1.0)
    assert [v.restart for v in verdicts] == [True] * 5 + [False]
    assert verdicts[-1].num_deaths == 6 and verdicts[-1].span_s == 25.0


def test_a_death_leaves_the_window_once_window_s_has_passed():
    budget = RestartBudget(POLICY)
    for now in (0.0, 1.0, 2.0, 3.0, 4.0):
        assert budget.record_exit(now).restart
    verdict = budget.record_exit(60.0)  # the death at 0 is out: five in the window
    assert verdict.restart and verdict.num_deaths == 5 and verdict.span_s == 59.0
    assert not budget.record_exit(60.5).restart


def test_back_off_doubles_for_deaths_in_a_row_and_is_capped():
    budget = RestartBudget(RestartPolicy(max_restarts=100, window_s=1.0, max_backoff_s=30.0))
    delays = [budget.record_exit(float(i * 100)).delay_s for i in range(8)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_back_off_stays_finite_for_an_endless_streak():
    assert RestartBudget(POLICY).backoff_s(10_000) == POLICY.max_backoff_s


def test_a_stable_run_resets_the_back_off_and_a_short_one_does_not():
    budget = RestartBudget(RestartPolicy(max_restarts=100, stable_s=60.0))
    assert budget.record_exit(0.0).delay_s == 0.0
    budget.record_ready(1.0)
    assert budget.record_exit(30.0).delay_s == 1.0  # up 29 s: still a streak
    assert budget.record_exit(31.0).delay_s == 2.0  # never got ready
    budget.record_ready(40.0)
    assert budget.record_exit(100.0).delay_s == 0.0  # up 60 s: a new streak


@pytest.mark.parametrize(
    "bad",
    [
        {"max_restarts": -1},
        {"window_s": 0.0},
        {"first_backoff_s": 2.0, "max_backoff_s": 1.0},
        {"first_backoff_s": -1.0},
    ],
)
def test_a_policy_that_makes_no_sense_is_refused(bad):
    with pytest.raises(ValueError):
        RestartPolicy(**bad)
