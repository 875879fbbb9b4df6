"""How often `fastserve up` restarts a child that keeps dying: a rate, with back-off.

A worker or the kvstore holds only a cache, so one that dies is started again. Deaths spread
over time are what a long-running stack meets (an OOM kill, an operator's test kill) and never
add up to a stop; a child that dies again and again in a short time is a crash loop that a
restart will not fix, and the stack stops so that the failure is seen. Hence a sliding window:
at most `max_restarts` restarts within any `window_s`. Between deaths that follow each other
without the child having stayed up `stable_s` the restart waits, doubling each time up to
`max_backoff_s`, so a loop burns little CPU while it fills the window.

Pure: the caller passes the time (`now`, in seconds on a monotonic clock), so tests need no
sleeping and no processes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    max_restarts: int = 5  # restarts allowed within any window_s; one more death stops the stack
    window_s: float = 60.0
    first_backoff_s: float = 1.0  # wait before the restart after the second quick death in a row
    max_backoff_s: float = 30.0
    stable_s: float = 60.0  # up (ready) this long: the next death starts a new streak, no wait

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window_s <= 0 or self.stable_s < 0:
            raise ValueError(f"bad restart policy {self}")
        if not 0 <= self.first_backoff_s <= self.max_backoff_s:
            raise ValueError(f"bad restart back-off {self}")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do about one death."""

    restart: bool  # False: a crash loop, stop the stack
    delay_s: float  # wait this long before starting the replacement
    num_deaths: int  # deaths within the window, this one included
    span_s: float  # from the first of those deaths to this one


class RestartBudget:
    """One child's deaths and readiness; `record_exit` says whether and when to restart it."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._deaths: deque[float] = deque()
        self._streak = 0  # deaths in a row, none after a stable run
        self._ready_at: float | None = None

    def record_ready(self, now: float) -> None:
        self._ready_at = now

    def record_exit(self, now: float) -> Verdict:
        policy = self.policy
        if self._ready_at is not None and now - self._ready_at >= policy.stable_s:
            self._streak = 0
        self._ready_at = None
        self._streak += 1
        while self._deaths and self._deaths[0] <= now - policy.window_s:
            self._deaths.popleft()
        self._deaths.append(now)
        num_deaths, span_s = len(self._deaths), now - self._deaths[0]
        if num_deaths > policy.max_restarts:
            return Verdict(False, 0.0, num_deaths, span_s)
        return Verdict(True, self.backoff_s(self._streak), num_deaths, span_s)

    def backoff_s(self, streak: int) -> float:
        """The wait before restarting after the `streak`-th death in a row: none for the first
        (a lone death is restarted at once), then doubling from `first_backoff_s`."""
        if streak <= 1:
            return 0.0
        policy = self.policy
        # The exponent is capped: a streak can outlast any float (deaths spaced past the window).
        return min(policy.max_backoff_s, policy.first_backoff_s * 2.0 ** min(streak - 2, 64))
