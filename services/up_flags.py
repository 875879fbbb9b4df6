"""Which service flags `fastserve up` takes, and which child each one goes to.

Every service flag a user may set reaches its service through `up` in one of three ways:
a row of PASSED (`up` has the flag, often under the service's own name, and hands the value on),
WIRED (the launcher sets it itself: ports, addresses, stage wiring, or from an `up` flag it also
uses), or LEFT_OUT (not offered, with the reason). tests/common/test_up_flags.py fails on a
service flag that is in none of them, so a new one cannot go silently unreachable from `up`.

A PASSED value of None is not handed on: the service's own default (or its FASTSERVE_* variable,
which every child inherits) applies. A secret goes in the child's environment variable instead of
its command line, which any local user can read in `ps`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from services.common.flags import add_flag, env_name
from services.common.model_source import LOAD_FORMATS
from services.frontend import auth
from services.scheduler.core.config import KV_POLICIES

FRONTEND, SCHEDULER, WORKER, KVSTORE = "frontend", "scheduler", "worker", "kvstore"


@dataclass(frozen=True, slots=True)
class Passed:
    flag: str  # `fastserve up`'s flag
    service: str  # the service that takes it
    service_flag: str = ""  # the service's name for it, when not `flag`
    aliases: tuple[str, ...] = ()  # more names of `flag` on `up`
    # add_flag's arguments for `up`'s parser; None: another module defines the flag for both.
    kwargs: dict[str, Any] | None = None
    secret: bool = False  # handed on in the service's FASTSERVE_* variable, not its argv

    @property
    def target(self) -> str:
        return self.service_flag or self.flag

    @property
    def dest(self) -> str:
        return (self.kwargs or {}).get("dest") or self.flag.lstrip("-").replace("-", "_")


def _row(flag: str, service: str, text: str, service_flag: str = "", **kwargs: Any) -> Passed:
    if kwargs.get("default") is None and kwargs.get("action") != "store_true":
        text += f" (default: the {service}'s)"
    return Passed(flag, service, service_flag, kwargs=dict(kwargs, help=text))


PASSED: tuple[Passed, ...] = (
    _row("--default-max-tokens", FRONTEND, "output cap when unset", type=int, default=1024),
    _row("--max-body-bytes", FRONTEND, "largest HTTP request body", type=int),
    _row("--max-prompt-chars", FRONTEND, "longest prompt, in characters", type=int),
    _row(
        "--max-queued-requests",
        FRONTEND,
        "requests in flight before new ones get RESOURCE_EXHAUSTED / HTTP 429 (0: no bound)",
        type=int,
    ),
    _row(
        "--drain-timeout",
        FRONTEND,
        "on Ctrl-C / SIGTERM, seconds the frontend's requests in flight may take to finish "
        "before the scheduler and workers are stopped",
        type=float,
        default=30.0,
    ),
    Passed("--api-key", FRONTEND, secret=True),  # auth.add_arguments, as the frontend's
    Passed("--api-key-file", FRONTEND),
    _row(
        "--priority-classes", FRONTEND, "priority classes, 0 runs first (1: one for all)", type=int
    ),
    _row("--default-priority", FRONTEND, "the class of a request that asks for none", type=int),
    _row(
        "--top-priority",
        FRONTEND,
        "the highest class a caller may use unless its API key names one",
        type=int,
    ),
    _row("--max-batch-size", SCHEDULER, "jobs per iteration", type=int, default=16),
    _row("--max-batched-tokens", SCHEDULER, "tokens per iteration", type=int, default=2048),
    _row(
        "--kv-policy",
        SCHEDULER,
        "KV under preemption: swap ahead of need, swap at need, or recompute",
        default="proactive",
        choices=KV_POLICIES,
    ),
    _row("--reserve-blocks", SCHEDULER, "-1: 5%% of the pool", type=int, default=-1),
    _row("--swap-cost-scale", SCHEDULER, "0: always swap", type=float, default=1.0),
    _row("--no-prefix-cache", SCHEDULER, "no sharing of cached prefixes", action="store_true"),
    _row(
        "--no-async-scheduling",
        SCHEDULER,
        "wait for each step's tokens before scheduling the next",
        action="store_true",
    ),
    _row(
        "--host-cache-blocks",
        SCHEDULER,
        "cached prefix blocks kept in the kvstore (-1: as many as the device pool; 0: none)",
        type=int,
        default=-1,
    ),
    _row("--worker-timeout", SCHEDULER, "seconds to wait for the workers", type=float),
    _row("--load-format", WORKER, "dummy: random", default="auto", choices=LOAD_FORMATS),
    _row(
        "--dtype",
        WORKER,
        "weights and KV",
        default="float32",
        choices=("bfloat16", "float16", "float32"),
    ),
    _row("--block-size", WORKER, "tokens per KV block", type=int, default=16),
    Passed(
        "--kv-blocks",
        WORKER,
        "--num-blocks",
        aliases=("--num-blocks",),
        kwargs={
            "dest": "num_blocks",
            "type": int,
            "default": 0,
            "help": "device KV blocks per worker, to force memory pressure (0: from --kv-bytes)",
        },
    ),
    _row("--kv-bytes", WORKER, "worker KV pool bytes", type=int, default=1 << 30),
    _row(
        "--attention-backend",
        WORKER,
        "paged attention: cpu-kernel (CPU default), triton (CUDA default) or reference "
        "(gather + SDPA)",
        choices=("auto", "cpu-kernel", "triton", "reference"),
    ),
    _row(
        "--launch-ahead",
        WORKER,
        "launch a waiting command before collecting the previous one's tokens (auto: on CUDA)",
        default="auto",
        choices=("auto", "on", "off"),
    ),
    _row(
        "--cuda-graph-max-batch",
        WORKER,
        "on CUDA, decode steps of up to this many jobs replay CUDA graphs (0: never; default: "
        "--max-batch-size, the most a decode step can hold)",
        type=int,
    ),
    _row(
        "--cuda-graph-max-len",
        WORKER,
        "context the CUDA graphs cover; longer jobs' steps run eagerly",
        type=int,
        default=4096,
    ),
    _row(
        "--pipeline-backend",
        WORKER,
        "activations between stages: nccl on GPU, gloo on CPU (auto picks by --device)",
        choices=("auto", "gloo", "nccl"),
    ),
    _row(
        "--stage-timeout",
        WORKER,
        "seconds a stage waits for the others (forming the group, activations)",
        type=float,
    ),
    _row(
        "--kvstore-backend",
        KVSTORE,
        "kvstore storage: memory, or a Redis URL redis://host:port/db",
        "--backend",
        default="memory",
    ),
    _row(
        "--kvstore-capacity-bytes",
        KVSTORE,
        "kvstore capacity",
        "--capacity-bytes",
        type=int,
        default=4 << 30,
    ),
    _row("--kvstore-redis-prefix", KVSTORE, "namespace of the kvstore's keys", "--redis-prefix"),
    _row(
        "--kvstore-shm-dir",
        KVSTORE,
        "tmpfs directory for the same-host shared-memory path; empty turns it off",
        "--shm-dir",
    ),
    _row(
        "--kvstore-shm-pool-bytes",
        KVSTORE,
        "released shm bytes kept for reuse",
        "--shm-pool-bytes",
        type=int,
    ),
)

_LOOPBACK = "loopback: only the other services call it"
_LOG_LEVEL = "up --log-level"
_REUSE_PORT = "joins the port the launcher reserved"
_METRICS = "up --metrics: a free port, logged"
_POLICY = "up has the scheduler's own policy flags (add_policy_arguments, policy_argv)"

WIRED: dict[str, dict[str, str]] = {
    FRONTEND: {
        "--host": "up --host",
        "--port": "up --grpc-port",
        "--http-port": "up --http-port",
        "--reuse-port": _REUSE_PORT,
        "--scheduler-address": "the scheduler the launcher started",
        "--model": "up --model",
        "--log-level": _LOG_LEVEL,
    },
    SCHEDULER: {
        "--host": _LOOPBACK,
        "--port": "up --scheduler-port",
        "--reuse-port": _REUSE_PORT,
        "--metrics-port": _METRICS,
        "--worker-address": "the workers the launcher started",
        "--kvstore-address": "the kvstore the launcher started",
        **dict.fromkeys(
            (
                "--policy",
                "--policy-option",
                "--base-quantum-ms",
                "--quantum-ratio",
                "--num-queues",
                "--starvation-ms",
                "--profile-dir",
            ),
            _POLICY,
        ),
        "--log-level": _LOG_LEVEL,
    },
    WORKER: {
        "--host": _LOOPBACK,
        "--port": "up --worker-port (stage 0), free ports for the others",
        "--reuse-port": _REUSE_PORT,
        "--metrics-port": _METRICS,
        "--model": "up --model",
        "--device": "up --device (also picks the CPU plan)",
        "--kvstore-address": "the kvstore the launcher started",
        "--threads": "up --worker-threads and the CPU plan (cpu_plan)",
        "--cpus": "the CPU plan (cpu_plan)",
        "--stage-index": "up --stages",
        "--num-stages": "up --stages",
        "--layer-split": "up --layer-split",
        "--rendezvous-address": "the store the launcher reserved for stage 0",
        "--rendezvous-fd": "the store the launcher reserved for stage 0",
        "--log-level": _LOG_LEVEL,
    },
    KVSTORE: {
        "--host": _LOOPBACK,
        "--port": "up --kvstore-port",
        "--reuse-port": _REUSE_PORT,
        "--log-level": _LOG_LEVEL,
    },
}

_KUBERNETES = "Kubernetes discovery; up wires the addresses of the processes it started"
_STOPPED_IN_ORDER = (
    "up stops it only after the frontend has drained (up --drain-timeout): nothing is left to "
    "drain; a pod stopped on its own by Kubernetes needs it"
)
LEFT_OUT: dict[str, dict[str, str]] = {
    FRONTEND: {},
    SCHEDULER: {
        **dict.fromkeys(
            ("--discovery", "--namespace", "--worker-selector", "--kvstore-selector"), _KUBERNETES
        ),
        "--drain-timeout": _STOPPED_IN_ORDER,
    },
    WORKER: {"--drain-timeout": _STOPPED_IN_ORDER},
    KVSTORE: {},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The PASSED flags on `up`'s parser."""
    for row in PASSED:
        if row.kwargs is not None:
            add_flag(parser, row.flag, *row.aliases, **row.kwargs)
    auth.add_arguments(parser)


def service_argv(args: argparse.Namespace, service: str) -> list[str]:
    """The PASSED values for `service` as command-line flags (secrets excepted)."""
    argv: list[str] = []
    for row in PASSED:
        if row.service != service or row.secret:
            continue
        value = getattr(args, row.dest)
        if value is None or value is False:
            continue
        if value is True:
            argv.append(row.target)
        elif isinstance(value, list):
            for item in value:
                argv += [row.target, str(item)]
        else:
            argv += [row.target, str(value)]
    return argv


def service_env(args: argparse.Namespace, service: str) -> dict[str, str]:
    """The secret PASSED values for `service`, as the FASTSERVE_* variables it reads."""
    env = {}
    for row in PASSED:
        value = getattr(args, row.dest) if row.service == service and row.secret else None
        if not value:
            continue
        items = value if isinstance(value, list) else [value]
        if any("," in str(item) for item in items):
            # The variable separates several values with commas.
            raise ValueError(f"{row.flag}: a value cannot contain a comma")
        env[env_name(row.target)] = ",".join(map(str, items))
    return env
