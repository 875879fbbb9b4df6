"""The local launcher: port reservations, stage wiring, and flag checks."""

from __future__ import annotations

import argparse
import os
import socket
import time
from unittest import mock

import grpc
import pytest

from services.common.grpc_server import bind, build_server
from services.launcher import (
    FRONTEND_STOP_MARGIN_S,
    PortReservations,
    available_cpus,
    cpu_plan,
    plan,
    stage_devices,
)
from services.launcher import add_arguments as add_launcher_arguments
from services.supervisor import STOP_GRACE_S


def planned(*flags: str) -> dict:
    """`fastserve up`'s children for `flags` (free ports picked), by name."""
    parser = argparse.ArgumentParser()
    add_launcher_arguments(parser)
    ports = PortReservations()
    try:
        args = parser.parse_args(["--grpc-port", "0", "--http-port", "0", *flags])
        return {c.name: c for c in plan(args, ports)}
    finally:
        ports.close()


def test_a_reserved_port_is_refused_to_others_and_joined_by_a_reuse_port_server():
    ports = PortReservations()
    try:
        port = ports.pick()
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        plain, _ = build_server(["x"])  # SO_REUSEPORT off: a busy port is an error
        with pytest.raises((OSError, RuntimeError)):
            bind(plain, f"127.0.0.1:{port}")
        server, _ = build_server(["x"], reuse_port=True)
        assert bind(server, f"127.0.0.1:{port}") == port
        server.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=5)
        server.stop(0).wait()
    finally:
        ports.close()
    # Released on close. The server's side of the probe connection may be left in TIME_WAIT
    # (a fresh-clone CI run hit EADDRINUSE here): SO_REUSEADDR binds past that, yet not past a
    # reservation still held (it does not set SO_REUSEADDR); and retry while the stopped
    # server's listener closes.
    deadline = time.monotonic() + 5
    while True:
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                again.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.05)


def test_plan_picks_distinct_ports_and_tells_children_to_join_them():
    parser = argparse.ArgumentParser()
    add_launcher_arguments(parser)
    ports = PortReservations()
    try:
        for _ in range(20):
            args = parser.parse_args(["--grpc-port", "0", "--http-port", "0"])
            children = plan(args, ports)
            picked = [int(c.address.rsplit(":", 1)[1]) for c in children] + [args.http_port]
            assert len(set(picked)) == len(picked) and 0 not in picked
            assert all("--reuse-port" in c.argv for c in children)
    finally:
        ports.close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--stages", "0"], "--stages must be >= 1"),
        (["--stages", "2", "--layer-split", "1,1,2"], "names 3 stages"),
        (["--stages", "2", "--layer-split", "1;3"], "--layer-split must be"),
        (["--api-key", "a,b"], "--api-key: a value cannot contain a comma"),
    ],
)
def test_bad_stage_flags_are_refused_before_anything_starts(flags, message):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--grpc-port", "0", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_plan_wires_one_worker_per_stage_to_the_scheduler():
    children = planned("--stages", "3")
    workers = [children[f"worker{i}"] for i in range(3)]
    scheduler = children["scheduler"].argv
    addresses = scheduler[scheduler.index("--worker-address") + 1].split(",")
    assert addresses == [w.address for w in workers]
    rendezvous = {w.argv[w.argv.index("--rendezvous-address") + 1] for w in workers}
    assert len(rendezvous) == 1  # one store, served by stage 0 on the inherited socket
    assert [w.argv[w.argv.index("--stage-index") + 1] for w in workers] == ["0", "1", "2"]
    assert workers[0].pass_fds and "--rendezvous-fd" in workers[0].argv
    assert all(w.restartable for w in workers) and not children["scheduler"].restartable


def test_cpu_plan_gives_each_stage_its_own_cpus_and_a_thread_each():
    assert cpu_plan([0, 1], 1) == [(2, [0, 1])]
    assert cpu_plan([0, 1], 2) == [(1, [0]), (1, [1])]
    assert cpu_plan([0, 1, 2, 3, 4], 2) == [(3, [0, 1, 2]), (2, [3, 4])]
    assert cpu_plan([0, 1, 2, 3], 2, threads=1) == [(1, [0, 1]), (1, [2, 3])]
    assert cpu_plan([4, 6], 3) == [(1, [4]), (1, [6]), (1, [4])]  # more stages than CPUs


def test_workers_are_told_their_threads_and_cpus():
    children = planned("--stages", "2")
    expected = cpu_plan(available_cpus(), 2)
    for index, (threads, cpus) in enumerate(expected):
        argv = children[f"worker{index}"].argv
        assert argv[argv.index("--threads") + 1] == str(threads)
        assert argv[argv.index("--cpus") + 1] == ",".join(map(str, cpus))


def test_up_hands_api_keys_and_the_queue_bound_to_the_frontend(monkeypatch):
    """`fastserve up --api-key K --max-queued-requests N` reaches the frontend: the bound on its
    command line, the keys in its environment (a command line is visible to every user)."""
    monkeypatch.delenv("FASTSERVE_API_KEY", raising=False)
    flags = ["--api-key", "s3cr3t", "--api-key", "other", "--max-queued-requests", "7"]
    children = planned(*flags)
    frontend = children.pop("frontend")
    assert frontend.argv[frontend.argv.index("--max-queued-requests") + 1] == "7"
    assert frontend.env == {"FASTSERVE_API_KEY": "s3cr3t,other"}
    assert not any("s3cr3t" in arg for c in [frontend, *children.values()] for arg in c.argv)
    assert not any(c.env for c in children.values())
    from services.frontend.main import add_arguments as add_frontend_arguments

    with mock.patch.dict(os.environ, frontend.env):
        frontend_parser = argparse.ArgumentParser()
        add_frontend_arguments(frontend_parser)
    seen = frontend_parser.parse_args(frontend.argv[1:])
    assert seen.api_key == ["s3cr3t", "other"] and seen.max_queued_requests == 7


def test_up_stops_the_frontend_first_with_a_grace_that_covers_its_drain_timeout():
    children = planned("--stages", "2", "--drain-timeout", "45")
    frontend, scheduler = children.pop("frontend"), children.pop("scheduler")
    assert frontend.argv[frontend.argv.index("--drain-timeout") + 1] == "45.0"
    assert frontend.stop_grace_s == 45.0 + FRONTEND_STOP_MARGIN_S
    assert frontend.stop_stage < scheduler.stop_stage
    assert all(scheduler.stop_stage < c.stop_stage for c in children.values())  # workers, kvstore
    assert all(c.stop_grace_s == STOP_GRACE_S for c in [scheduler, *children.values()])


def test_a_negative_drain_timeout_is_refused():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--grpc-port", "0", "--drain-timeout", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--drain-timeout must be >= 0" in result.stderr


def test_each_stage_gets_its_own_gpu_unless_told_otherwise():
    assert stage_devices("cpu", 2) == ["cpu", "cpu"]
    assert stage_devices("cuda", 1) == ["cuda"]
    assert stage_devices("cuda", 3) == ["cuda:0", "cuda:1", "cuda:2"]  # NCCL: a GPU per stage
    assert stage_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]  # as asked (with gloo)
    assert stage_devices("cuda:1, cuda:0", 2) == ["cuda:1", "cuda:0"]
    with pytest.raises(ValueError, match="names 3 devices, --stages is 2"):
        stage_devices("cuda:0,cuda:1,cuda:2", 2)
    children = planned("--stages", "2", "--device", "cuda")
    devices = [children[f"worker{i}"].argv for i in range(2)]
    assert [argv[argv.index("--device") + 1] for argv in devices] == ["cuda:0", "cuda:1"]


def _flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_cuda_workers_capture_graphs_up_to_the_schedulers_batch():
    """A decode step holds at most --max-batch-size jobs, so by default the workers capture
    graphs up to that; an explicit --cuda-graph-max-batch wins, and CPU workers get none."""
    argv = planned("--device", "cuda", "--max-batch-size", "24")["worker"].argv
    assert _flag_values(argv, "--cuda-graph-max-batch") == ["24"]
    argv = planned("--device", "cuda")["worker"].argv
    assert _flag_values(argv, "--cuda-graph-max-batch") == ["16"]  # up's default batch
    explicit = planned("--device", "cuda", "--cuda-graph-max-batch", "0")["worker"].argv
    assert _flag_values(explicit, "--cuda-graph-max-batch") == ["0"]
    assert "--cuda-graph-max-batch" not in planned()["worker"].argv
