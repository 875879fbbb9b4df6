"""The children of `fastserve up`: started, watched until ready, restarted or stopped.

Each child's stdout and stderr pass through the launcher line by line (to its own stdout and
stderr), so the launcher sees the child's ready line (`<service> ready on <address>`, printed by
`announce_ready`) and keeps its last lines for the message that names a child that failed.
Supervision is one non-blocking step, `poll`, which the launcher calls in a loop: it notices
ready lines and exits, and starts a due replacement, so a child that restarts or waits out its
back-off never holds up the others.

Each child runs in its own process group, so a Ctrl-C at the terminal reaches only the launcher,
which stops the children in order (`stop_all`): the frontend first, waited for while it drains
(its requests in flight finish), then the scheduler, then the workers and the kvstore, so no
admitted request loses the processes it runs on. A second Ctrl-C / SIGTERM cuts the wait short
(the frontend gets a second SIGTERM, which ends its drain); a third kills what is left.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO

from services.restart_budget import RestartBudget, RestartPolicy

log = logging.getLogger("launcher")

STOP_GRACE_S = 8.0  # a child's time from SIGTERM to exit before it is killed
NUM_TAIL_LINES = 20  # a child's last lines of output, quoted when it fails
_PR_SET_PDEATHSIG = 1
_SERVICE_COMMAND = (sys.executable, "-m", "services.cli")


@dataclass
class Child:
    name: str
    argv: list[str]  # `fastserve` arguments: the service, then its flags
    address: str
    # Its state is only a cache that the others rebuild (the kvstore: swapped-out jobs are
    # recomputed), so if it dies it is started again instead of stopping the stack.
    restartable: bool = False
    pass_fds: tuple[int, ...] = ()  # inherited sockets (stage 0's rendezvous store)
    env: dict[str, str] = field(default_factory=dict)  # variables on top of the launcher's
    command: tuple[str, ...] = _SERVICE_COMMAND  # what runs `argv`
    # Stopping: children of a lower stop_stage are stopped (and waited for) before the next
    # stage is sent SIGTERM; each gets stop_grace_s from its SIGTERM before it is killed.
    stop_stage: int = 0
    stop_grace_s: float = STOP_GRACE_S
    process: subprocess.Popen | None = None
    ready: bool = False  # the current process printed its ready line
    was_ready: bool = False  # some process of this child did: only then is it restarted
    num_restarts: int = 0
    started_at: float = 0.0  # time.monotonic() of the current process's start
    restart_at: float | None = None  # a replacement is due at this time.monotonic()
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=NUM_TAIL_LINES), repr=False)
    # The current process's output relays, and their note of its ready line.
    relays: list[threading.Thread] = field(default_factory=list, repr=False)
    ready_line: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def ready_prefix(self) -> str:
        return f"{self.argv[0]} ready on "

    def last_output(self) -> str:
        lines = list(self.tail)
        if not lines:
            return f"{self.name} printed nothing"
        return f"last {len(lines)} lines of {self.name}'s output:\n" + "".join(
            f"  | {line}" for line in lines
        )


@dataclass(frozen=True)
class Failure:
    """A child whose end stops the stack, and why."""

    child: Child
    reason: str  # e.g. "exited with code 1"

    def message(self) -> str:
        return f"fastserve: {self.child.name} {self.reason}; stopping the others\n" + (
            self.child.last_output()
        )


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"exited, killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"exited, killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Starts `children`, restarts the restartable ones under `policy`, and gives each process
    (first or replacement) `ready_timeout_s` to print its ready line."""

    def __init__(
        self,
        children: list[Child],
        policy: RestartPolicy | None = None,
        ready_timeout_s: float = 900.0,
    ) -> None:
        self.children = children
        self.policy = policy or RestartPolicy()
        self.ready_timeout_s = ready_timeout_s
        self._budgets = {child.name: RestartBudget(self.policy) for child in children}
        self._stopping = False
        self._stop_requests = 0  # stop signals received: 2 hurries the stop, 3 kills
        self._echo_lock = threading.Lock()

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.ready = False
        child.ready_line = threading.Event()
        child.started_at = time.monotonic()
        # Unbuffered: a child's lines reach the launcher (and the terminal) as they are written.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **child.env}
        child.process = subprocess.Popen(
            [*child.command, *child.argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=env,
            preexec_fn=_die_with_parent,
            pass_fds=child.pass_fds,
            # Its own process group: a terminal's Ctrl-C goes to the launcher alone, which
            # stops the children in order (stop_all).
            process_group=0,
        )
        child.relays = [
            threading.Thread(
                target=self._relay,
                args=(child, stream, is_stdout, child.ready_line),
                name=f"{child.name}-output",
                daemon=True,
            )
            for stream, is_stdout in ((child.process.stdout, True), (child.process.stderr, False))
        ]
        for relay in child.relays:
            relay.start()
        log.info("started %s (pid %d) on %s", child.name, child.process.pid, child.address)

    def _relay(
        self, child: Child, stream: IO[str], is_stdout: bool, ready_line: threading.Event
    ) -> None:
        """Copies one of a child's streams to the launcher's same stream, line by line, keeping
        its last lines and noting its ready line."""
        for line in stream:
            child.tail.append(line)
            if is_stdout and line.startswith(child.ready_prefix):
                ready_line.set()
            with self._echo_lock:
                out = sys.stdout if is_stdout else sys.stderr
                try:
                    out.write(line)
                    out.flush()
                except (OSError, ValueError):
                    pass  # the launcher's own output is gone; the child must not block on it
        stream.close()

    def poll(self) -> Failure | None:
        """One round of supervision: ready lines, exits, due restarts, late children. Returns
        why the stack must stop: a child that may not be restarted exited, one is in a crash
        loop, or one did not get ready in time."""
        now = time.monotonic()
        for child in self.children:
            if child.process is None or self._stopping:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restart_at = None
                    child.num_restarts += 1
                    self._spawn(child)
                continue
            if not child.ready and child.ready_line.is_set():
                self._mark_ready(child, now)
            code = child.process.poll()
            if code is not None:
                failure = self._exited(child, code, now)
                if failure is not None:
                    return failure
            elif not child.ready and now - child.started_at > self.ready_timeout_s:
                after = f" after restart {child.num_restarts}" if child.num_restarts else ""
                return Failure(child, f"did not become ready in {self.ready_timeout_s:.0f}s{after}")
        return None

    def _exited(self, child: Child, code: int, now: float) -> Failure | None:
        for relay in child.relays:
            relay.join(timeout=0.5)  # its last lines (a traceback) belong in the message
        if not (child.restartable and child.was_ready):
            # One that fails to start (bad flags, a model that does not load) would fail again,
            # and the scheduler and frontend hold state nobody rebuilds.
            return Failure(child, exit_reason(code))
        verdict = self._budgets[child.name].record_exit(now, code)
        policy = self.policy
        if not verdict.restart:
            return Failure(
                child,
                f"{exit_reason(code)}: it died {verdict.num_deaths} times in "
                f"{verdict.span_s:.1f}s, before getting ready or on its own, more than the "
                f"{policy.max_restarts} restarts allowed within {policy.window_s:g}s "
                "(a crash loop)",
            )
        child.ready = False
        child.restart_at = now + verdict.delay_s
        when = f"in {verdict.delay_s:g}s" if verdict.delay_s > 0 else "now"
        if verdict.counted:
            budget = (
                f"crash-loop deaths within {policy.window_s:g}s: {verdict.num_deaths}; at "
                f"{policy.max_restarts + 1} the stack stops"
            )
        else:
            budget = "killed from outside after getting ready: not counted as a crash loop"
        _say(f"{child.name} {exit_reason(code)}; restarting it {when} ({budget})")
        return None

    def _mark_ready(self, child: Child, now: float) -> None:
        child.ready = child.was_ready = True
        self._budgets[child.name].record_ready(now)
        if child.num_restarts:
            _say(f"{child.name} is ready again on {child.address} (restart {child.num_restarts})")
        else:
            log.info("%s is ready", child.name)

    def wait_ready(self) -> Failure | None:
        """Waits until every child has printed its ready line; returns why not, if it failed."""
        while not all(c.ready for c in self.children):
            if self._stopping:
                return None
            failure = self.poll()
            if failure is not None:
                return failure
            time.sleep(0.05)
        return None

    def supervise(self, interval_s: float = 0.2) -> Failure | None:
        """Supervises until a stop is requested (None) or the stack must stop (why)."""
        while not self._stopping:
            failure = self.poll()
            if failure is not None:
                return failure
            time.sleep(interval_s)
        return None

    def request_stop(self, *_: object) -> None:
        """The launcher's SIGTERM / SIGINT handler: the first stops the stack in order, a
        second hurries the stop (cuts the frontend's drain short), a third kills the rest."""
        self._stopping = True
        self._stop_requests += 1

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop_all(self) -> None:
        """Stops every child, stage by stage (`Child.stop_stage`): each stage gets SIGTERM and
        is waited for, up to each child's `stop_grace_s`, before the next one is told."""
        self._stopping = True
        for stage in sorted({child.stop_stage for child in self.children}):
            group = [c for c in self.children if c.stop_stage == stage and c.process is not None]
            self._stop_group(list(reversed(group)))

    def _stop_group(self, group: list[Child]) -> None:
        alive = [c for c in group if c.process is not None and c.process.poll() is None]
        hurried = self._stop_requests >= 2
        deadlines = {}
        for child in alive:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
            grace = min(child.stop_grace_s, STOP_GRACE_S) if hurried else child.stop_grace_s
            deadlines[child.name] = time.monotonic() + grace
            if grace > STOP_GRACE_S:
                _say(
                    f"stopping {child.name}: up to {grace:g}s for its requests in flight "
                    "(Ctrl-C again to cut it short)"
                )
        while alive:
            if not hurried and self._stop_requests >= 2:
                hurried = True  # a second signal: cut the waits short
                for child in alive:
                    assert child.process is not None
                    child.process.send_signal(signal.SIGTERM)
                    deadlines[child.name] = min(
                        deadlines[child.name], time.monotonic() + STOP_GRACE_S
                    )
            now = time.monotonic()
            for child in alive:
                assert child.process is not None
                if self._stop_requests >= 3 or now >= deadlines[child.name]:
                    if self._stop_requests < 3:
                        log.warning("%s did not stop in time; killing it", child.name)
                    child.process.kill()
            alive = [c for c in alive if c.process is not None and c.process.poll() is None]
            if alive:
                time.sleep(0.02)
        for child in group:
            assert child.process is not None
            child.process.wait()
            for relay in child.relays:
                relay.join(timeout=0.5)  # its last lines reach the launcher's output


def _say(message: str) -> None:
    print(f"fastserve: {message}", file=sys.stderr, flush=True)
