"""`fastserve up`: every service as its own OS process on this machine.

Starts the kvstore, worker, scheduler and frontend at once (model loading overlaps), waits until
each reports SERVING on its gRPC health service, then prints one `ready` line. It supervises
them: if one exits, it names it, stops the rest and exits non-zero, so a half-running stack never
looks healthy. SIGTERM / SIGINT stop every child; children also get SIGTERM if the launcher
itself dies (PR_SET_PDEATHSIG), so nothing is orphaned.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from services.common.flags import add_flag
from services.common.health import is_serving
from services.common.logs import LOG_LEVELS, setup_logging
from services.common.model_source import DEFAULT_MODEL, LOAD_FORMATS
from services.scheduler.core.config import KV_POLICIES
from services.scheduler.policy_flags import add_policy_arguments, policy_argv
from services.worker.stage_layout import parse_layer_split

log = logging.getLogger("launcher")

STOP_GRACE_S = 8.0
MAX_RESTARTS = 5
_PR_SET_PDEATHSIG = 1
DEFAULT_HTTP_PORT = 8000


@dataclass
class Child:
    name: str
    argv: list[str]
    address: str
    process: subprocess.Popen | None = None
    ready: bool = False
    # Its state is only a cache that the others rebuild (the kvstore: swapped-out jobs are
    # recomputed), so if it dies it is started again instead of stopping the stack.
    restartable: bool = False
    num_restarts: int = 0
    pass_fds: tuple[int, ...] = ()  # inherited sockets (stage 0's rendezvous store)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--model", default=DEFAULT_MODEL, help="model name, HF folder or .gguf")
    add_flag(parser, "--load-format", default="auto", choices=LOAD_FORMATS, help="dummy: random")
    add_flag(parser, "--host", default="127.0.0.1", help="interface for the public port")
    add_flag(parser, "--grpc-port", type=int, default=50051, help="public gRPC port (0 picks one)")
    add_flag(
        parser,
        "--http-port",
        type=int,
        default=None,
        help=f"OpenAI-compatible HTTP port (unset: {DEFAULT_HTTP_PORT}, or a free one if that "
        "is taken; 0: pick one; -1: no HTTP)",
    )
    add_flag(parser, "--scheduler-port", type=int, default=0, help="0 picks a free port")
    add_flag(
        parser, "--worker-port", type=int, default=0, help="stage 0's port (0 picks free ports)"
    )
    add_flag(parser, "--stages", type=int, default=1, help="pipeline stages (worker processes)")
    add_flag(
        parser,
        "--layer-split",
        default="",
        help="decoder layers per stage, comma-separated, e.g. 10,20 (empty: even split)",
    )
    add_flag(parser, "--kvstore-port", type=int, default=0, help="0 picks a free port")
    add_policy_arguments(parser)
    add_flag(parser, "--max-batch-size", type=int, default=16, help="jobs per iteration")
    add_flag(parser, "--max-batched-tokens", type=int, default=2048, help="tokens per iteration")
    add_flag(parser, "--device", default="cpu", help="worker device: cpu, cuda, cuda:N")
    add_flag(parser, "--dtype", default="float32", help="float32, bfloat16 or float16")
    add_flag(
        parser,
        "--worker-threads",
        type=int,
        default=0,
        help="compute threads per worker (0: this machine's CPUs shared out among the stages, "
        "each stage pinned to its own; see docs/engine-cpu.md)",
    )
    add_flag(parser, "--block-size", type=int, default=16, help="tokens per KV block")
    add_flag(
        parser,
        "--kv-blocks",
        "--num-blocks",
        dest="num_blocks",
        type=int,
        default=0,
        help="device KV blocks per worker, to force memory pressure (0: from --kv-bytes)",
    )
    add_flag(
        parser,
        "--kv-policy",
        default="proactive",
        choices=KV_POLICIES,
        help="KV under preemption: swap ahead of need, swap at need, or recompute",
    )
    add_flag(parser, "--reserve-blocks", type=int, default=-1, help="-1: 5%% of the pool")
    add_flag(parser, "--swap-cost-scale", type=float, default=1.0, help="0: always swap")
    add_flag(parser, "--no-prefix-cache", action="store_true", help="no sharing of cached prefixes")
    add_flag(
        parser,
        "--host-cache-blocks",
        type=int,
        default=-1,
        help="cached prefix blocks kept in the kvstore (-1: as many as the device pool; 0: none)",
    )
    add_flag(
        parser,
        "--kvstore-backend",
        default="memory",
        help="kvstore storage: memory, or a Redis URL redis://host:port/db",
    )
    add_flag(parser, "--kvstore-capacity-bytes", type=int, default=4 << 30, help="kvstore capacity")
    add_flag(parser, "--kv-bytes", type=int, default=1 << 30, help="worker KV pool bytes")
    add_flag(parser, "--default-max-tokens", type=int, default=1024, help="when unset")
    add_flag(
        parser,
        "--metrics",
        action="store_true",
        help="Prometheus /metrics ports on the scheduler and each worker (free ports, logged)",
    )
    add_flag(parser, "--startup-timeout", type=float, default=900.0, help="seconds to get ready")
    add_flag(parser, "--log-level", default="info", choices=LOG_LEVELS, help="log verbosity")


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def cpu_plan(cpus: list[int], num_stages: int, threads: int = 0) -> list[tuple[int, list[int]]]:
    """(threads, CPU ids) of each stage's worker on one machine.

    Each stage gets its own CPUs, so pipeline stages do not take each other's cores, and as many
    OpenMP threads as it has CPUs (more would only contend). With fewer CPUs than stages, stages
    share them round-robin, one thread each. `threads` > 0 caps every stage's count.
    """
    if num_stages > len(cpus):
        return [(1, [cpus[i % len(cpus)]]) for i in range(num_stages)]
    base, extra = divmod(len(cpus), num_stages)
    plan, start = [], 0
    for index in range(num_stages):
        count = base + (index < extra)
        share = cpus[start : start + count]
        plan.append((min(threads, count) if threads > 0 else count, share))
        start += count
    return plan


class PortReservations:
    """Free ports picked by the launcher and held until it exits.

    A port found free and released is a race: another process can take it before the child
    binds it (CI saw two services handed the same port). A reservation keeps a bound, not
    listening, socket with SO_REUSEPORT open, so the kernel gives the port to nobody else, while
    the child (started with `--reuse-port`) can still bind and listen on it.
    """

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []

    def pick(self, host: str = "127.0.0.1") -> int:
        return int(self.pick_socket(host).getsockname()[1])

    def pick_socket(self, host: str = "127.0.0.1") -> socket.socket:
        """The reserved socket itself, for a child that serves on the inherited socket."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
        self._sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def http_port(args: argparse.Namespace, ports: PortReservations) -> int:
    """The frontend's HTTP port: as asked, except that the unset default yields when busy."""
    if args.http_port is None:
        if port_is_free(DEFAULT_HTTP_PORT, args.host):
            return DEFAULT_HTTP_PORT
        return ports.pick(args.host)
    return ports.pick(args.host) if args.http_port == 0 else int(args.http_port)


def plan(args: argparse.Namespace, ports: PortReservations) -> list[Child]:
    """The four children and their command lines (the same entry points a container runs).
    Ports given as 0 are picked and held in `ports`; `args` is updated with the picks."""
    local = "127.0.0.1"
    kv_port = args.kvstore_port or ports.pick()
    worker_ports = [args.worker_port or ports.pick()]
    worker_ports += [ports.pick() for _ in range(1, args.stages)]
    sched_port = args.scheduler_port or ports.pick()
    args.grpc_port = args.grpc_port or ports.pick(args.host)
    args.http_port = http_port(args, ports)
    common = ["--log-level", args.log_level, "--reuse-port"]
    # Picked by the child, not reserved here: the metrics server cannot share a reserved port.
    metrics = ["--metrics-port", "0"] if args.metrics else []
    model = ["--model", args.model]
    stage_flags: list[list[str]] = [[] for _ in worker_ports]
    pass_fds: tuple[int, ...] = ()
    if args.stages > 1:
        # Stage 0 serves the rendezvous store on a socket the launcher holds, so a restarted
        # stage 0 serves it again on the same port.
        store = ports.pick_socket(local)
        pass_fds = (store.fileno(),)
        for index, flags in enumerate(stage_flags):
            flags += [
                "--stage-index", str(index), "--num-stages", str(args.stages),
                "--rendezvous-address", f"{local}:{store.getsockname()[1]}",
                "--layer-split", args.layer_split,
            ]  # fmt: skip
        stage_flags[0] += ["--rendezvous-fd", str(store.fileno())]
    if args.device == "cpu":
        for flags, (threads, cpus) in zip(
            stage_flags, cpu_plan(available_cpus(), args.stages, args.worker_threads), strict=True
        ):
            flags += ["--threads", str(threads), "--cpus", ",".join(map(str, cpus))]
    workers = [
        Child(
            "worker" if args.stages == 1 else f"worker{index}",
            [
                "worker", "--port", str(port), *model,
                "--load-format", args.load_format, "--device", args.device,
                "--dtype", args.dtype, "--block-size", str(args.block_size),
                "--num-blocks", str(args.num_blocks), "--kv-bytes", str(args.kv_bytes),
                "--kvstore-address", f"{local}:{kv_port}", *stage_flags[index], *metrics,
                *common,
            ],
            f"{local}:{port}",
            # A worker holds only a cache: the scheduler re-prefills what a restart lost.
            restartable=True,
            pass_fds=pass_fds if index == 0 else (),
        )
        for index, port in enumerate(worker_ports)
    ]  # fmt: skip
    return [
        Child(
            "kvstore",
            [
                "kvstore", "--port", str(kv_port), "--backend", args.kvstore_backend,
                "--capacity-bytes", str(args.kvstore_capacity_bytes), *common,
            ],
            f"{local}:{kv_port}",
            restartable=True,
        ),
        *workers,
        Child(
            "scheduler",
            [
                "scheduler", "--port", str(sched_port),
                "--worker-address", ",".join(f"{local}:{port}" for port in worker_ports),
                "--kvstore-address", f"{local}:{kv_port}", *policy_argv(args),
                "--kv-policy", args.kv_policy, "--reserve-blocks", str(args.reserve_blocks),
                "--swap-cost-scale", str(args.swap_cost_scale),
                *(["--no-prefix-cache"] if args.no_prefix_cache else []),
                "--host-cache-blocks", str(args.host_cache_blocks),
                "--max-batch-size", str(args.max_batch_size),
                "--max-batched-tokens", str(args.max_batched_tokens), *metrics, *common,
            ],
            f"{local}:{sched_port}",
        ),
        Child(
            "frontend",
            [
                "frontend", "--host", args.host, "--port", str(args.grpc_port),
                "--scheduler-address", f"{local}:{sched_port}", *model,
                "--default-max-tokens", str(args.default_max_tokens),
                "--http-port", str(args.http_port), *common,
            ],
            f"{args.host}:{args.grpc_port}",
        ),
    ]  # fmt: skip


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class Supervisor:
    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self._stopping = False

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *child.argv],
            preexec_fn=_die_with_parent,
            pass_fds=child.pass_fds,
        )
        log.info("started %s (pid %d) on %s", child.name, child.process.pid, child.address)

    def dead_child(self) -> Child | None:
        """A child that exited and cannot be restarted; restartable ones are started again."""
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                continue
            # Only a child that once got ready: one that fails to start (bad flags, a model that
            # does not load) would fail again.
            if (
                child.restartable
                and child.ready
                and not self._stopping
                and child.num_restarts < MAX_RESTARTS
            ):
                child.num_restarts += 1
                print(
                    f"fastserve: {child.name} exited with code {child.process.returncode}; "
                    f"restarting it ({child.num_restarts}/{MAX_RESTARTS})",
                    file=sys.stderr,
                    flush=True,
                )
                self._spawn(child)
                continue
            return child
        return None

    def wait_ready(self, timeout_s: float) -> Child | None:
        """Waits until every child is SERVING; returns a child that died or timed out."""
        deadline = time.monotonic() + timeout_s
        while not all(c.ready for c in self.children):
            if self._stopping:
                return None
            dead = self.dead_child()
            if dead is not None:
                return dead
            for child in self.children:
                if not child.ready and is_serving(child.address, timeout_s=0.5):
                    child.ready = True
                    log.info("%s is ready", child.name)
            if time.monotonic() > deadline:
                return next(c for c in self.children if not c.ready)
            time.sleep(0.2)
        return None

    def request_stop(self, *_: object) -> None:
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop_all(self) -> None:
        # Frontend first, so clients see a clean UNAVAILABLE rather than half an answer.
        for child in reversed(self.children):
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", child.name, STOP_GRACE_S)
                child.process.kill()
                child.process.wait()


def run(args: argparse.Namespace) -> int:
    setup_logging("launcher", args.log_level)
    if args.stages < 1:
        print(f"fastserve: --stages must be >= 1, got {args.stages}", file=sys.stderr)
        return 2
    try:
        split = parse_layer_split(args.layer_split)
    except ValueError as exc:
        print(f"fastserve: {exc}", file=sys.stderr)
        return 2
    if split is not None and len(split) != args.stages:
        print(
            f"fastserve: --layer-split names {len(split)} stages, --stages is {args.stages}",
            file=sys.stderr,
        )
        return 2
    ports = PortReservations()
    supervisor = Supervisor(plan(args, ports))
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    supervisor.start()
    try:
        failed = supervisor.wait_ready(args.startup_timeout)
        if failed is not None:
            code = failed.process.poll() if failed.process else None
            why = f"exited with code {code}" if code is not None else "did not become ready"
            print(f"fastserve: {failed.name} {why}; stopping the others", file=sys.stderr)
            return 1
        if supervisor.stopping:
            return 0
        frontend = supervisor.children[-1]
        http = (
            f"HTTP http://{args.host}:{args.http_port} " if args.http_port >= 0 else ""
        )  # "http://" keeps the address out of the per-service "name host:port" pairs
        print(
            f"fastserve ready: gRPC {frontend.address} {http}"
            f"(model {args.model}; "
            + ", ".join(f"{c.name} {c.address}" for c in supervisor.children[:-1])
            + ")",
            flush=True,
        )
        while not supervisor.stopping:
            dead = supervisor.dead_child()
            if dead is not None:
                code = dead.process.poll() if dead.process else None
                print(
                    f"fastserve: {dead.name} exited with code {code}; stopping the others",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.2)
        return 0
    finally:
        supervisor.stop_all()
        ports.close()
