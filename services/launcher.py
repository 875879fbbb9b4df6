"""`fastserve up`: every service as its own OS process on this machine.

Starts the kvstore, worker, scheduler and frontend at once (model loading overlaps), waits until
each prints its ready line, then prints one `ready` line. It supervises them (services/
supervisor.py): a worker or the kvstore that dies is started again, within a restart budget
(services/restart_budget.py); if the scheduler or frontend exits, or a child is in a crash loop,
it names it, stops the rest and exits non-zero, so a half-running stack never looks healthy.
SIGTERM / SIGINT stop the children in order, so no admitted request is lost: the frontend first,
waited for while it drains (its requests in flight finish, up to --drain-timeout), then the
scheduler, then the workers and the kvstore; a second Ctrl-C cuts the drain short, a third kills
them. Children also get SIGTERM if the launcher itself dies (PR_SET_PDEATHSIG), so nothing is
orphaned. Which service flags `up` takes and hands on:
services/up_flags.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from services import up_flags
from services.common.flags import add_flag
from services.common.logs import LOG_LEVELS, setup_logging
from services.common.model_source import DEFAULT_MODEL
from services.scheduler.policy_flags import add_policy_arguments, policy_argv
from services.supervisor import Child, Supervisor
from services.up_flags import FRONTEND, KVSTORE, SCHEDULER, WORKER, service_argv, service_env
from services.worker.stage_layout import parse_layer_split

DEFAULT_HTTP_PORT = 8000
# The frontend's time to stop, beyond its --drain-timeout: closing its servers and its link.
FRONTEND_STOP_MARGIN_S = 10.0
# Stop order (Child.stop_stage): the frontend drains first, then the scheduler, then the rest.
STOP_FRONTEND, STOP_SCHEDULER, STOP_BACKENDS = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--model", default=DEFAULT_MODEL, help="model name, HF folder or .gguf")
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
    add_flag(
        parser,
        "--device",
        default="cpu",
        help="worker device: cpu, cuda, cuda:N, or one per stage, comma-separated; with several "
        "stages, cuda gives stage i cuda:i (NCCL needs a GPU per stage)",
    )
    add_flag(
        parser,
        "--worker-threads",
        type=int,
        default=0,
        help="compute threads per worker (0: this machine's CPUs shared out among the stages, "
        "each stage pinned to its own; see docs/engine-cpu.md)",
    )
    up_flags.add_arguments(parser)
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


def stage_devices(device: str, num_stages: int) -> list[str]:
    """Each stage's `--device`: `device` for all, except that `cuda` with several stages gives
    stage i `cuda:i` (NCCL cannot run two stages on one GPU), and a comma-separated list names
    one device per stage. ValueError when a list has the wrong length."""
    if "," in device:
        devices = [d.strip() for d in device.split(",")]
        if len(devices) != num_stages:
            raise ValueError(f"--device names {len(devices)} devices, --stages is {num_stages}")
        return devices
    if device == "cuda" and num_stages > 1:
        return [f"cuda:{i}" for i in range(num_stages)]
    return [device] * num_stages


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
    # Loopback, explicitly: an inherited FASTSERVE_HOST is meant for the public port only.
    internal = ["--host", local, *common]
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
    devices = stage_devices(args.device, args.stages)
    if args.device != "cpu" and args.cuda_graph_max_batch is None:
        # A decode step holds at most the scheduler's batch: no graph for more is ever replayed
        # (and each one captured costs start-up time).
        for flags in stage_flags:
            flags += ["--cuda-graph-max-batch", str(args.max_batch_size)]
    if args.device == "cpu":
        for flags, (threads, cpus) in zip(
            stage_flags, cpu_plan(available_cpus(), args.stages, args.worker_threads), strict=True
        ):
            flags += ["--threads", str(threads), "--cpus", ",".join(map(str, cpus))]
    workers = [
        Child(
            "worker" if args.stages == 1 else f"worker{index}",
            [
                WORKER, "--port", str(port), *model, "--device", devices[index],
                "--kvstore-address", f"{local}:{kv_port}", *stage_flags[index], *metrics,
                *service_argv(args, WORKER), *internal,
            ],
            f"{local}:{port}",
            # A worker holds only a cache: the scheduler re-prefills what a restart lost.
            restartable=True,
            pass_fds=pass_fds if index == 0 else (),
            env=service_env(args, WORKER),
            stop_stage=STOP_BACKENDS,
        )
        for index, port in enumerate(worker_ports)
    ]  # fmt: skip
    return [
        Child(
            KVSTORE,
            [KVSTORE, "--port", str(kv_port), *service_argv(args, KVSTORE), *internal],
            f"{local}:{kv_port}",
            restartable=True,
            env=service_env(args, KVSTORE),
            stop_stage=STOP_BACKENDS,
        ),
        *workers,
        Child(
            SCHEDULER,
            [
                SCHEDULER, "--port", str(sched_port),
                "--worker-address", ",".join(f"{local}:{port}" for port in worker_ports),
                "--kvstore-address", f"{local}:{kv_port}", *policy_argv(args), *metrics,
                *service_argv(args, SCHEDULER), *internal,
            ],
            f"{local}:{sched_port}",
            env=service_env(args, SCHEDULER),
            stop_stage=STOP_SCHEDULER,
        ),
        Child(
            FRONTEND,
            [
                FRONTEND, "--host", args.host, "--port", str(args.grpc_port),
                "--scheduler-address", f"{local}:{sched_port}", *model,
                "--http-port", str(args.http_port), *service_argv(args, FRONTEND), *common,
            ],
            f"{args.host}:{args.grpc_port}",
            env=service_env(args, FRONTEND),
            stop_stage=STOP_FRONTEND,
            stop_grace_s=args.drain_timeout + FRONTEND_STOP_MARGIN_S,
        ),
    ]  # fmt: skip


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
    if args.drain_timeout < 0:
        print(f"fastserve: --drain-timeout must be >= 0, got {args.drain_timeout}", file=sys.stderr)
        return 2
    ports = PortReservations()
    try:
        children = plan(args, ports)
    except ValueError as exc:
        ports.close()
        print(f"fastserve: {exc}", file=sys.stderr)
        return 2
    supervisor = Supervisor(children, ready_timeout_s=args.startup_timeout)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    supervisor.start()
    try:
        failed = supervisor.wait_ready()
        if failed is None and not supervisor.stopping:
            _announce_ready(args, supervisor)
            failed = supervisor.supervise()
        if failed is not None:
            print(failed.message(), file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        supervisor.stop_all()
        ports.close()


def _announce_ready(args: argparse.Namespace, supervisor: Supervisor) -> None:
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
