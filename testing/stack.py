"""Starts a real `fastserve up` (four OS processes) for end-to-end tests, and stops it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fastserve.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from testing.scheduler_stats import SchedulerStatsView

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    return _children_by_parent().get(pid, [])


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), deepest last."""
    children = _children_by_parent()
    found, frontier = [], [pid]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return found


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Stack:
    process: subprocess.Popen
    output: list[str] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)  # service name -> host:port
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, model: str | Path, *flags: str) -> Stack:
        # Port 0: the launcher picks every port and holds it until its child binds it (ports
        # picked here and released would race with the stacks that start side by side).
        argv = [
            sys.executable, "-m", "services.cli", "up", "--model", str(model),
            "--grpc-port", "0", "--log-level", "warning",
            # A free HTTP port unless the caller names one: stacks start side by side.
            *(() if "--http-port" in flags else ("--http-port", "0")), *flags,
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        stack = cls(process)
        ready = threading.Event()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                stack.output.append(line)
                if "fastserve ready" in line:
                    stack.addresses = dict(re.findall(r"(\w+) (\d+\.\d+\.\d+\.\d+:\d+)", line))
                    stack.addresses["frontend"] = stack.addresses.pop("gRPC")
                    ready.set()

        stack._reader = threading.Thread(target=read, daemon=True)
        stack._reader.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.wait(0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                stack.stop()
                raise RuntimeError("fastserve up failed:\n" + "".join(stack.output[-60:]))
        return stack

    @property
    def address(self) -> str:
        """The frontend's public gRPC address."""
        return self.addresses["frontend"]

    @property
    def scheduler_address(self) -> str:
        return self.addresses["scheduler"]

    def child_pids(self) -> list[int]:
        return child_pids(self.process.pid)

    def scheduler_stats(self) -> SchedulerStatsView:
        with grpc.insecure_channel(self.scheduler_address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            return SchedulerStatsView.from_pb(stub.Stats(scheduler_pb2.StatsRequest(), timeout=5))

    def wait_for_stats(self, predicate, timeout_s: float = 10.0) -> SchedulerStatsView:
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.scheduler_stats()
            if predicate(stats) or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)

    def wait_until_idle(self, predicate=lambda s: True, timeout_s: float = 20.0):
        """Stats once no job is left and every block is free, on the scheduler and on every
        stage. The workers free a finished job's blocks when the next command reaches them,
        so the scheduler's own count reads all-free an iteration before the stages do."""
        return self.wait_for_stats(
            lambda s: (
                s["kv_blocks_free"] == s["kv_blocks_total"]
                and s["worker_kv_blocks_used"] == 0
                and not any(s.per_stage("kv_blocks_used"))
                and s["running_jobs"] == s["waiting_jobs"] == 0
                and predicate(s)
            ),
            timeout_s,
        )

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
