"""The launcher's Supervisor with real child processes: tiny Python scripts that print a ready
line like a service's, so restarts, back-off and crash loops take seconds, not model loads."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.launcher import PortReservations, plan
from services.launcher import add_arguments as add_launcher_arguments
from services.restart_budget import RestartPolicy
from services.supervisor import Child, Failure, Supervisor

# Counts its starts in CHILD_STARTS; from start CHILD_CRASH_FROM on it fails before getting ready,
# from start CHILD_SLOW_FROM on it takes CHILD_SLOW_S to get ready; with CHILD_EXIT_AFTER_S it
# exits with code CHILD_EXIT_CODE that long after getting ready. With CHILD_STOPS it notes each
# SIGTERM and its exit there (name, event, time.monotonic(), which is system-wide) and lingers
# CHILD_LINGER_S after the first SIGTERM, as a draining service does; a second one ends it.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    name = sys.argv[1]
    starts = os.environ["CHILD_STARTS"]
    with open(starts, "a") as f:
        f.write("start\\n")
    start = len(open(starts).read().splitlines())
    stops = os.environ.get("CHILD_STOPS")
    def note(event):
        with open(stops, "a") as f:
            f.write(f"{name} {event} {time.monotonic()}\\n")
    leave_at = None
    def on_term(signum, frame):
        global leave_at
        note("sigterm")
        if leave_at is not None:
            leave_at = 0.0
        else:
            leave_at = time.monotonic() + float(os.environ.get("CHILD_LINGER_S") or 0)
    if stops:
        signal.signal(signal.SIGTERM, on_term)
    if start >= int(os.environ.get("CHILD_CRASH_FROM") or 10**9):
        print("boom: cannot load the model", file=sys.stderr, flush=True)
        sys.exit(3)
    if start >= int(os.environ.get("CHILD_SLOW_FROM") or 10**9):
        time.sleep(float(os.environ["CHILD_SLOW_S"]))
    print(f"{name} ready on test:{start}", flush=True)
    exit_at = time.monotonic() + float(os.environ.get("CHILD_EXIT_AFTER_S") or 10**9)
    while True:
        time.sleep(0.01)
        if leave_at is not None and time.monotonic() >= leave_at:
            note("exit")
            sys.exit(0)
        if time.monotonic() >= exit_at:
            print("fatal: lost my mind", file=sys.stderr, flush=True)
            sys.exit(int(os.environ.get("CHILD_EXIT_CODE") or 1))
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
    worker = make_child(tmp_path, "worker", CHILD_EXIT_AFTER_S="0.35", CHILD_EXIT_CODE="1")
    scheduler = make_child(tmp_path, "scheduler", restartable=False)
    supervisor = supervise([worker, scheduler], policy=policy)
    # Up past stable_s each time: no back-off, and at most three deaths in a window.
    assert drive(supervisor, lambda: worker.num_restarts == 6 and worker.ready) is None
    assert scheduler.process.poll() is None and scheduler.num_restarts == 0
    err = capsys.readouterr().err
    assert err.count("worker exited with code 1; restarting it now (crash-loop deaths") == 6


def test_the_issues_six_kills_5s_apart_after_ready_do_not_stop_the_stack(
    tmp_path, supervise, capsys
):
    """Seen: six SIGKILLs 5 s apart, each after the replacement was ready, then exit code 1.
    Here they are 0.05 s apart, all within one window and one streak of deaths: a kill from
    outside of a ready child is restarted with back-off but never counts as a crash loop."""
    policy = RestartPolicy(
        max_restarts=5, window_s=60.0, first_backoff_s=0.02, max_backoff_s=0.08, stable_s=60.0
    )
    worker = make_child(tmp_path, "worker")
    scheduler = make_child(tmp_path, "scheduler", restartable=False)
    supervisor = supervise([worker, scheduler], policy=policy)
    assert supervisor.wait_ready() is None
    victims = []
    for _ in range(7):
        assert drive(supervisor, lambda: worker.ready) is None
        time.sleep(0.05)
        victims.append(worker.process.pid)
        os.kill(victims[-1], signal.SIGKILL)
        assert drive(supervisor, lambda: worker.process.pid != victims[-1]) is None
    assert drive(supervisor, lambda: worker.ready) is None
    assert worker.num_restarts == 7 and len(set(victims)) == 7
    assert scheduler.process.poll() is None and scheduler.num_restarts == 0
    err = capsys.readouterr().err
    outside = "(killed from outside after getting ready: not counted as a crash loop)"
    assert f"worker exited, killed by SIGKILL; restarting it now {outside}" in err
    for delay in ("0.02", "0.04", "0.08"):
        assert f"worker exited, killed by SIGKILL; restarting it in {delay}s {outside}" in err
    for restart in range(1, 8):
        assert f"worker is ready again on test:worker (restart {restart})" in err


def test_a_child_that_keeps_exiting_on_its_own_after_ready_is_a_crash_loop(
    tmp_path, supervise, capsys
):
    policy = RestartPolicy(max_restarts=5, window_s=30.0, first_backoff_s=0.01, max_backoff_s=0.05)
    worker = make_child(tmp_path, "worker", CHILD_EXIT_AFTER_S="0.05", CHILD_EXIT_CODE="1")
    supervisor = supervise([worker, make_child(tmp_path, "kvstore")], policy=policy)
    failure = drive(supervisor, lambda: False)
    assert isinstance(failure, Failure) and failure.child is worker
    assert worker.num_restarts == 5
    message = failure.message()
    assert message.startswith("fastserve: worker exited with code 1: it died 6 times in ")
    assert "more than the 5 restarts allowed within 30s (a crash loop); stopping the others" in (
        message
    )
    assert "  | fatal: lost my mind" in message
    err = capsys.readouterr().err
    assert (
        "worker exited with code 1; restarting it in 0.05s (crash-loop deaths within 30s: 5; "
        "at 6 the stack stops)"
    ) in err


def test_a_crash_loop_stops_the_stack_naming_the_child_its_deaths_and_its_output(
    tmp_path, supervise, capsys
):
    policy = RestartPolicy(max_restarts=5, window_s=30.0, first_backoff_s=0.05, max_backoff_s=0.2)
    # Its first run gets ready; every replacement fails while starting.
    worker = make_child(tmp_path, "worker", CHILD_CRASH_FROM="2")
    supervisor = supervise([worker, make_child(tmp_path, "kvstore")], policy=policy)
    assert supervisor.wait_ready() is None
    began = time.monotonic()
    os.kill(worker.process.pid, signal.SIGKILL)  # from outside, after ready: not counted
    failure = drive(supervisor, lambda: False)
    assert isinstance(failure, Failure) and failure.child is worker
    assert worker.num_restarts == 6
    assert time.monotonic() - began >= 0.05 + 0.1 + 0.2 + 0.2 + 0.2  # the back-off between deaths
    message = failure.message()
    assert message.startswith("fastserve: worker exited with code 3: it died 6 times in ")
    assert "more than the 5 restarts allowed within 30s (a crash loop); stopping the others" in (
        message
    )
    assert "last " in message and "  | boom: cannot load the model" in message
    err = capsys.readouterr().err
    assert "worker exited, killed by SIGKILL; restarting it now (killed from outside" in err
    for delay in ("0.05", "0.1", "0.2"):
        assert f"worker exited with code 3; restarting it in {delay}s (crash-loop deaths" in err


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


def stop_stack(tmp_path: Path, frontend_linger_s: float, frontend_grace_s: float, **kwargs):
    """A frontend (stop stage 0, lingering `frontend_linger_s` after SIGTERM as a draining one
    does), a scheduler (1), a worker and a kvstore (2), ready; returns them and the supervisor."""
    stops = str(tmp_path / "stops")
    children = [
        make_child(tmp_path, "kvstore", CHILD_STOPS=stops, CHILD_LINGER_S="0.1"),
        make_child(tmp_path, "worker", CHILD_STOPS=stops, CHILD_LINGER_S="0.1"),
        make_child(tmp_path, "scheduler", restartable=False, CHILD_STOPS=stops),
        make_child(
            tmp_path, "frontend", restartable=False, CHILD_STOPS=stops,
            CHILD_LINGER_S=str(frontend_linger_s),
        ),
    ]  # fmt: skip
    for child, stage in zip(children, (2, 2, 1, 0), strict=True):
        child.stop_stage = stage
    children[-1].stop_grace_s = frontend_grace_s
    supervisor = Supervisor(children, **kwargs)
    supervisor.start()
    assert supervisor.wait_ready() is None
    return supervisor, children


def stop_events(tmp_path: Path) -> list[tuple[str, str, float]]:
    lines = (tmp_path / "stops").read_text().splitlines()
    return [(name, event, float(at)) for name, event, at in (line.split() for line in lines)]


def test_stop_all_stops_the_frontend_first_waits_for_its_drain_then_scheduler_then_the_rest(
    tmp_path,
):
    supervisor, children = stop_stack(tmp_path, frontend_linger_s=1.0, frontend_grace_s=5.0)
    # Each child has its own process group: a terminal's Ctrl-C reaches the launcher alone.
    assert all(os.getpgid(c.process.pid) != os.getpgrp() for c in children)
    supervisor.request_stop()
    began = time.monotonic()
    supervisor.stop_all()
    assert time.monotonic() - began >= 1.0  # the frontend's drain was waited for
    assert all(c.process.returncode == 0 for c in children)  # none was killed
    at = {(name, event): t for name, event, t in stop_events(tmp_path)}
    assert at["frontend", "sigterm"] + 1.0 <= at["frontend", "exit"] <= at["scheduler", "sigterm"]
    assert at["scheduler", "exit"] <= min(at["worker", "sigterm"], at["kvstore", "sigterm"])


def test_a_second_stop_request_cuts_the_frontends_drain_short(tmp_path):
    supervisor, children = stop_stack(tmp_path, frontend_linger_s=60.0, frontend_grace_s=90.0)
    supervisor.request_stop()
    timer = threading.Timer(0.5, supervisor.request_stop)  # the second Ctrl-C
    timer.start()
    began = time.monotonic()
    supervisor.stop_all()
    timer.join()
    assert time.monotonic() - began < 5.0
    events = stop_events(tmp_path)
    assert [e[1] for e in events if e[0] == "frontend"] == ["sigterm", "sigterm", "exit"]
    assert all(c.process.returncode == 0 for c in children)  # it stopped, not killed


def test_a_frontend_that_outstays_its_grace_is_killed_and_the_others_still_stopped(tmp_path):
    supervisor, children = stop_stack(tmp_path, frontend_linger_s=60.0, frontend_grace_s=0.5)
    supervisor.request_stop()
    began = time.monotonic()
    supervisor.stop_all()
    assert time.monotonic() - began < 5.0
    frontend = children[-1]
    assert frontend.process.returncode == -signal.SIGKILL
    assert all(c.process.returncode == 0 for c in children[:-1])
