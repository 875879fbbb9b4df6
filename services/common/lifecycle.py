"""Running a service process until SIGTERM / SIGINT, then stopping it gracefully.

A service that has work in flight drains first (`drain_while`): the scheduler runs its admitted
jobs to their end, a worker keeps serving while its scheduler is still connected, each up to its
`--drain-timeout`; a second signal cuts the drain short."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Callable

from services.common.flags import add_flag

log = logging.getLogger(__name__)

GRACE_S = 3.0
DRAIN_TIMEOUT_S = 30.0  # the scheduler's and workers' --drain-timeout default


_received: list[int] = []
_stop_requested = threading.Event()


def catch_stop_signals() -> None:
    """Routes SIGTERM / SIGINT to `wait_for_signal`. Call it before announcing readiness: a
    launcher may stop the service the moment it reads the ready line, and a signal that comes
    before the handler is installed would kill the process without its cleanup."""

    def handler(signum: int, _frame: object) -> None:
        _received.append(signum)
        _stop_requested.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def wait_for_signal() -> int:
    """Blocks the main thread until SIGTERM or SIGINT; returns the signal number."""
    catch_stop_signals()  # idempotent: a signal that came before stays recorded
    while not _stop_requested.wait(0.5):
        pass
    return _received[0]


def drain_while(busy: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    """After the stop signal: waits while `busy()`, up to `timeout_s`, or until a second stop
    signal cuts it short. Returns whether it ended because nothing was busy any more."""
    deadline = time.monotonic() + timeout_s
    while busy():
        if len(_received) > 1 or time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def add_drain_timeout_flag(parser: argparse.ArgumentParser, service: str, what: str) -> None:
    """`--drain-timeout`: on SIGTERM, how long `service` keeps serving `what` before it stops."""
    add_flag(
        parser,
        "--drain-timeout",
        type=float,
        default=DRAIN_TIMEOUT_S,
        help=f"on SIGTERM, seconds the {service} keeps serving {what} before it stops "
        "(a second SIGTERM stops it at once)",
    )


def run_until_signal(name: str, stop: Callable[[], None]) -> int:
    """Waits for a stop signal, calls `stop`, and returns the process exit code (0)."""
    signum = wait_for_signal()
    log.info("%s: received %s, stopping", name, signal.Signals(signum).name)
    stop()
    return 0


def announce_ready(name: str, address: str) -> None:
    """The one line a launcher or a human looks for."""
    print(f"{name} ready on {address}", flush=True)
