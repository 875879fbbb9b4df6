"""The restart budget: a rate of restarts with back-off, on a clock the test sets."""

from __future__ import annotations

import signal

import pytest

from services.restart_budget import RestartBudget, RestartPolicy, killed_from_outside

POLICY = RestartPolicy(
    max_restarts=5, window_s=60.0, first_backoff_s=1.0, max_backoff_s=30.0, stable_s=60.0
)
SIGKILL, SIGTERM, SIGINT = -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT
SIGSEGV, SIGABRT, SIGBUS = -signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS


def test_deaths_spread_wider_than_the_window_allows_never_stop_the_stack():
    budget = RestartBudget(POLICY)
    for death in range(100):
        now = death * 13.0  # at most 5 in any 60 s
        verdict = budget.record_exit(now, 1)
        assert verdict.restart and verdict.counted, death
        budget.record_ready(now + 1.0)


@pytest.mark.parametrize("code", [SIGKILL, SIGTERM, SIGINT])
def test_the_issues_six_kills_5s_apart_after_ready_do_not_stop_the_stack(code):
    """Seen: six SIGKILLs 5 s apart, each after the replacement was ready, stopped the stack."""
    budget = RestartBudget(POLICY)
    budget.record_ready(0.0)
    verdicts = []
    for kill in range(1, 31):  # and thirty of them just as little
        now = kill * 5.0
        verdicts.append(budget.record_exit(now, code))
        budget.record_ready(now + 1.0)
    assert all(v.restart and not v.counted and v.num_deaths == 0 for v in verdicts)
    # They are still restarted with back-off: none of them was up stable_s.
    assert [v.delay_s for v in verdicts[:7]] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]


@pytest.mark.parametrize("code", [1, 3, SIGSEGV, SIGABRT, SIGBUS])
def test_dying_on_its_own_after_ready_counts_a_sixth_within_the_window_is_a_crash_loop(code):
    budget = RestartBudget(POLICY)
    verdicts = []
    for now in (0.0, 5.0, 10.0, 15.0, 20.0, 25.0):
        budget.record_ready(now - 1.0)
        verdicts.append(budget.record_exit(now, code))
    assert [v.restart for v in verdicts] == [True] * 5 + [False]
    assert all(v.counted for v in verdicts)
    assert verdicts[-1].num_deaths == 6 and verdicts[-1].span_s == 25.0


@pytest.mark.parametrize("code", [SIGKILL, SIGTERM, 0, 1, SIGSEGV])
def test_any_death_before_getting_ready_counts(code):
    budget = RestartBudget(POLICY)
    budget.record_ready(0.0)
    assert not budget.record_exit(1.0, SIGKILL).counted  # the ready one, killed
    verdicts = [budget.record_exit(2.0 + i, code) for i in range(6)]  # replacements never ready
    assert all(v.counted for v in verdicts)
    assert [v.restart for v in verdicts] == [True] * 5 + [False]


def test_a_clean_exit_after_ready_counts():
    """Exit code 0 is the child ending on its own too: a worker is not meant to exit."""
    assert not killed_from_outside(0) and not killed_from_outside(None)
    budget = RestartBudget(POLICY)
    budget.record_ready(0.0)
    assert budget.record_exit(1.0, 0).counted


def test_outside_kills_mixed_with_a_crash_loop_do_not_hide_it():
    budget = RestartBudget(POLICY)
    verdicts = []
    for step in range(12):
        now = step * 2.0
        budget.record_ready(now - 1.0)
        verdicts.append(budget.record_exit(now, SIGKILL if step % 2 else 1))
    counted = [v for v in verdicts if v.counted]
    assert [v.num_deaths for v in counted] == [1, 2, 3, 4, 5, 6]
    assert [v.restart for v in verdicts] == [True] * 10 + [False] + [False]


def test_a_death_leaves_the_window_once_window_s_has_passed():
    budget = RestartBudget(POLICY)
    for now in (0.0, 1.0, 2.0, 3.0, 4.0):
        assert budget.record_exit(now, 1).restart
    verdict = budget.record_exit(60.0, 1)  # the death at 0 is out: five in the window
    assert verdict.restart and verdict.num_deaths == 5 and verdict.span_s == 59.0
    assert not budget.record_exit(60.5, 1).restart


def test_back_off_doubles_for_deaths_in_a_row_and_is_capped():
    budget = RestartBudget(RestartPolicy(max_restarts=100, window_s=1.0, max_backoff_s=30.0))
    delays = [budget.record_exit(float(i * 100), 1).delay_s for i in range(8)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_back_off_stays_finite_for_an_endless_streak():
    assert RestartBudget(POLICY).backoff_s(10_000) == POLICY.max_backoff_s


def test_a_stable_run_resets_the_back_off_and_a_short_one_does_not():
    budget = RestartBudget(RestartPolicy(max_restarts=100, stable_s=60.0))
    assert budget.record_exit(0.0, 1).delay_s == 0.0
    budget.record_ready(1.0)
    assert budget.record_exit(30.0, SIGKILL).delay_s == 1.0  # up 29 s: still a streak
    assert budget.record_exit(31.0, 1).delay_s == 2.0  # never got ready
    budget.record_ready(40.0)
    assert budget.record_exit(100.0, SIGKILL).delay_s == 0.0  # up 60 s: a new streak


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
