"""How often `fastserve up` restarts a child that keeps dying: a rate, with back-off.

A worker or the kvstore holds only a cache, so one that dies is started again. What stops the
stack is a crash loop, a failure a restart will not fix, and only deaths that look like one
count toward it:

- a death *counts* when the child died before it printed its ready line (it cannot start: a
  model that does not load, a port it cannot bind), or when it ended on its own after getting
  ready: a non-zero exit code, or a crash signal (SIGSEGV, SIGABRT, SIGBUS, ...);
- a child that had got ready and was then *killed from outside* (SIGKILL, SIGTERM, SIGINT: the
  kernel's OOM killer, an operator, a chaos test) is restarted but never counts: six such
  kills 5 s apart, each after the replacement got ready, are six restarts, not a stop.

Counted deaths are a sliding window: at most `max_restarts` within any `window_s`; one more is a
crash loop and the stack stops, so that the failure is seen. Every death, counted or not, is
restarted with back-off: between deaths that follow each other without the child having stayed
up `stable_s` the restart waits, doubling each time up to `max_backoff_s`, so a loop burns
little CPU while it fills the window, and a child killed over and over is not restarted in a
tight loop either.

Pure: the caller passes the time (`now`, in seconds on a monotonic clock) and how the child
ended (its exit code, negative for a signal, as `subprocess` reports it), so tests need no
sleeping and no processes.
"""

from __future__ import annotations

import signal
from collections import deque
from dataclasses import dataclass

# Signals something outside the child sends to end it; any other signal is the child's own
# crash (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL, ...).
OUTSIDE_KILL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT})


def killed_from_outside(code: int | None) -> bool:
    """Whether an exit code (negative: the signal that ended it) is a kill from outside."""
    return code is not None and code < 0 and -code in OUTSIDE_KILL_SIGNALS


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    max_restarts: int = 5  # counted deaths allowed within any window_s; one more stops the stack
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
    counted: bool  # the death counts toward the crash-loop limit (not a kill from outside)
    num_deaths: int  # counted deaths within the window (this one, if counted)
    span_s: float  # from the first of those deaths to now


class RestartBudget:
    """One child's deaths and readiness; `record_exit` says whether and when to restart it."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._deaths: deque[float] = deque()  # counted deaths
        self._streak = 0  # deaths in a row, none after a stable run
        self._ready_at: float | None = None

    def record_ready(self, now: float) -> None:
        self._ready_at = now

    def record_exit(self, now: float, code: int | None) -> Verdict:
        """One death at `now`, with the exit code `subprocess` reported (negative: killed by
        that signal)."""
        policy = self.policy
        was_ready = self._ready_at is not None
        if self._ready_at is not None and now - self._ready_at >= policy.stable_s:
            self._streak = 0
        self._ready_at = None
        self._streak += 1
        while self._deaths and self._deaths[0] <= now - policy.window_s:
            self._deaths.popleft()
        counted = not (was_ready and killed_from_outside(code))
        if counted:
            self._deaths.append(now)
        num_deaths = len(self._deaths)
        span_s = now - self._deaths[0] if self._deaths else 0.0
        if num_deaths > policy.max_restarts:
            return Verdict(False, 0.0, counted, num_deaths, span_s)
        return Verdict(True, self.backoff_s(self._streak), counted, num_deaths, span_s)

    def backoff_s(self, streak: int) -> float:
        """The wait before restarting after the `streak`-th death in a row: none for the first
        (a lone death is restarted at once), then doubling from `first_backoff_s`."""
        if streak <= 1:
            return 0.0
        policy = self.policy
        # The exponent is capped: a streak can outlast any float (deaths spaced past the window).
        return min(policy.max_backoff_s, policy.first_backoff_s * 2.0 ** min(streak - 2, 64))
