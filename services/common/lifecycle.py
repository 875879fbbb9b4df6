"""Running a service process until SIGTERM / SIGINT, then stopping it gracefully."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

GRACE_S = 3.0


def wait_for_signal() -> int:
    """Blocks the main thread until SIGTERM or SIGINT; returns the signal number."""
    received: list[int] = []
    done = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)
        done.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not done.wait(0.5):
        pass
    return received[0]


def run_until_signal(name: str, stop: Callable[[], None]) -> int:
    """Waits for a stop signal, calls `stop`, and returns the process exit code (0)."""
    signum = wait_for_signal()
    log.info("%s: received %s, stopping", name, signal.Signals(signum).name)
    stop()
    return 0


def announce_ready(name: str, address: str) -> None:
    """The one line a launcher or a human looks for."""
    print(f"{name} ready on {address}", flush=True)
