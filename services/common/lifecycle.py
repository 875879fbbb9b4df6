"""Running a service process until SIGTERM / SIGINT, then stopping it gracefully."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

GRACE_S = 3.0


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


def run_until_signal(name: str, stop: Callable[[], None]) -> int:
    """Waits for a stop signal, calls `stop`, and returns the process exit code (0)."""
    signum = wait_for_signal()
    log.info("%s: received %s, stopping", name, signal.Signals(signum).name)
    stop()
    return 0


def announce_ready(name: str, address: str) -> None:
    """The one line a launcher or a human looks for."""
    print(f"{name} ready on {address}", flush=True)
