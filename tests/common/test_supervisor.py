"""The launcher's Supervisor with real child processes: tiny Python scripts that print a ready
line like a service's, so restarts, back-off and crash loops take seconds, not model loads."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.launcher import PortReservations, plan
from services.launcher import add_arguments as add_launcher_arguments
from services.restart_budget import RestartPolicy
from services.supervisor import Child, Failure, Supervisor

# Counts its starts in CHILD_STARTS; from start CHILD_CRASH_FROM on it fails before getting ready,
# from start CHILD_SLOW_FROM on it takes CHILD_SLOW_S to get ready.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    starts = os.environ["CHILD_STARTS"]
    with open(starts, "a") as f:
        f.write("start\\n")
    start = len(open(starts).read().splitlines())
    if start >= int(os.environ.get("CHILD_CRASH_FROM") or 10**9):
        print("boom: cannot load the model", file=sys.stderr, flush=True)
        sys.exit(3)
    if start >= int(os.environ.get("CHILD_SLOW_FROM") or 10**9):
        time.sleep(float(os.environ["CHILD_SLOW_S"]))
    print(f"{sys.argv[1]} ready on test:{start}", flush=True)
    while True:
        time.sleep(1)
    """
)


def make_child(tmp_path: Path, name: str, restartable: bool = True, **env: str) -> Child:
    return Child(
        name,
        [name],
        f"test:{name}",
        restartable=restartable,
        env={"CHILD_STARTS": str(tmp_path / f"{name}.starts"), **env},
        command=(sys.executable, "-c", CHILD),
    )


def drive(supervisor: Supervisor, until: Callable[[], bool], timeout_s: float = 10.0):
    """Supervises, as the launcher's loop does, until `until()` or a failure (returned)."""
    deadline = time.monotonic() + timeout_s
    while not until():
        failure = supervisor.poll()
        if failure is not None:
            return failure
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return None


@pytest.fixture
def supervise():
    started: list[Supervisor] = []

    def make(children: list[Child], **kwargs) -> Supervisor:
        supervisor = Supervisor(children, **kwargs)
        started.append(supervisor)
        supervisor.start()
        return supervisor

    yield make
    for supervisor in started:
        supervisor.request_stop()
        supervisor.stop_all()


def test_six_deaths_spread_over_time_do_not_stop_the_stack(tmp_path, supervise, capsys):
    policy = RestartPolicy(max_restarts=5, window_s=1.0, first_backoff_s=0.05, stable_s=0.3)
    worker = make_child(tmp_path, "worker")
    scheduler = make_child(tmp_path, "scheduler", restartable=False)
    supervisor = supervise([worker, scheduler], policy=policy)
    assert supervisor.wait_ready() is None
    victims = []
    for _ in range(6):
        assert drive(supervisor, lambda: worker.ready) is None
        time.sleep(0.35)  # up past stable_s: no back-off, and at most three deaths in a window
        victims.append(worker.process.pid)
        os.kill(victims[-1], signal.SIGKILL)
        assert drive(supervisor, lambda: worker.process.pid != victims[-1]) is None
    assert drive(supervisor, lambda: worker.ready) is None
    assert worker.num_restarts == 6 and len(set(victims)) == 6
    assert scheduler.process.poll() is None and scheduler.num_restarts == 0
    err = capsys.readouterr().err
    assert err.count("worker exited, killed by SIGKILL; restarting it now") == 6
    for restart in range(1, 7):
        assert f"worker is ready again on test:worker (restart {restart})" in err


def test_a_crash_loop_stops_the_stack_naming_the_child_its_deaths_and_its_output(
    tmp_path, supervise, capsys
):
    policy = RestartPolicy(max_restarts=5, window_s=30.0, first_backoff_s=0.05, max_backoff_s=0.2)
    # Its first run gets ready; every replacement fails while starting.
    worker = make_child(tmp_path, "worker", CHILD_CRASH_FROM="2")
    supervisor = supervise([worker, make_child(tmp_path, "kvstore")], policy=policy)
    assert supervisor.wait_ready() is None
    began = time.monotonic()
    os.kill(worker.process.pid, signal.SIGKILL)
    failure = drive(supervisor, lambda: False)
    assert isinstance(failure, Failure) and failure.child is worker
    assert time.monotonic() - began >= 0.05 + 0.1 + 0.2 + 0.2  # the back-off between deaths
    message = failure.message()
    assert message.startswith("fastserve: worker exited with code 3: it died 6 times in ")
    assert "more than the 5 restarts allowed within 30s (a crash loop); stopping the others" in (
        message
    )
    assert "last " in message and "  | boom: cannot load the model" in message
    err = capsys.readouterr().err
    assert "worker exited, killed by SIGKILL; restarting it now" in err
    for delay in ("0.05", "0.1", "0.2"):
        assert f"worker exited with code 3; restarting it in {delay}s" in err


def test_a_slow_replacement_does_not_hold_up_the_others(tmp_path, supervise, capsys):
    worker = make_child(tmp_path, "worker", CHILD_SLOW_FROM="2", CHILD_SLOW_S="2.0")
    kvstore = make_child(tmp_path, "kvstore")
    scheduler = make_child(tmp_path, "scheduler", restartable=False)
    supervisor = supervise([kvstore, worker, scheduler])
    assert supervisor.wait_ready() is None
    os.kill(worker.process.pid, signal.SIGKILL)
    assert drive(supervisor, lambda: worker.num_restarts == 1) is None
    assert not worker.ready
    killed = kvstore.process.pid
    os.kill(killed, signal.SIGKILL)
    assert drive(supervisor, lambda: kvstore.ready and kvstore.process.pid != killed) is None
    assert not worker.ready  # the kvstore was restarted and ready while the worker loads
    scheduler.process.kill()  # and a failure elsewhere is seen at once
    failure = drive(supervisor, lambda: False, timeout_s=1.0)
    assert failure is not None and failure.child is scheduler
    assert failure.reason == "exited, killed by SIGKILL"
    assert "kvstore is ready again" in capsys.readouterr().err


def test_a_replacement_that_never_gets_ready_stops_the_stack(tmp_path, supervise):
    worker = make_child(tmp_path, "worker", CHILD_SLOW_FROM="2", CHILD_SLOW_S="60")
    supervisor = supervise([worker], ready_timeout_s=1.0)
    assert supervisor.wait_ready() is None
    os.kill(worker.process.pid, signal.SIGKILL)
    failure = drive(supervisor, lambda: False)
    assert failure is not None and failure.reason == "did not become ready in 1s after restart 1"


def test_a_child_that_fails_its_first_start_is_not_restarted(tmp_path, supervise):
    worker = make_child(tmp_path, "worker", CHILD_CRASH_FROM="1")
    failure = supervise([worker]).wait_ready()
    assert failure is not None and failure.reason == "exited with code 3"
    assert worker.num_restarts == 0 and "boom: cannot load the model" in failure.message()


def test_the_api_key_reaches_the_frontend_process_in_its_environment_not_its_command_line(
    tmp_path, supervise, monkeypatch
):
    monkeypatch.delenv("FASTSERVE_API_KEY", raising=False)
    parser = argparse.ArgumentParser()
    add_launcher_arguments(parser)
    ports = PortReservations()
    try:
        args = parser.parse_args(["--grpc-port", "0", "--http-port", "0", "--api-key", "s3cr3t"])
        frontend = next(c for c in plan(args, ports) if c.name == "frontend")
    finally:
        ports.close()
    stub = make_child(tmp_path, "frontend")  # the planned frontend, run by the stub script
    frontend.command, frontend.env = stub.command, {**frontend.env, **stub.env}
    supervisor = supervise([frontend])
    assert supervisor.wait_ready() is None
    pid = frontend.process.pid
    assert b"s3cr3t" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"FASTSERVE_API_KEY=s3cr3t\0" in Path(f"/proc/{pid}/environ").read_bytes()
