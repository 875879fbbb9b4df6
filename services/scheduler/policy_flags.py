"""Policy flags, defined once: `fastserve scheduler` uses them, `fastserve up` passes them on."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.common.flags import add_flag
from services.scheduler.core.policies import POLICY_NAMES

DEFAULT_PROFILE_DIR = Path.home() / ".cache" / "fastserve" / "profiles"
_NAMED = ("base_quantum_ms", "quantum_ratio", "num_queues", "starvation_ms")


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """Policy flags, shared with `fastserve up`, which passes them through."""
    add_flag(
        parser, "--policy", default="skip-join-mlfq", choices=POLICY_NAMES, help="queue policy"
    )
    parser.add_argument(
        "--policy-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="policy tuning, repeatable: charge=share|whole, starvation=credit|paper|off, "
        "backfill=on|off, base_quantum_s, quantum_ratio, num_queues, starvation_s",
    )
    add_flag(parser, "--base-quantum-ms", type=float, help="MLFQ q0 (default: one decode)")
    add_flag(parser, "--quantum-ratio", type=float, help="MLFQ quantum growth r (default 2)")
    add_flag(parser, "--num-queues", type=int, help="MLFQ queues (default: from the profile)")
    add_flag(parser, "--starvation-ms", type=float, help="promotion threshold (default: profile)")
    add_flag(parser, "--profile-dir", default=str(DEFAULT_PROFILE_DIR), help="profile cache")


def policy_options(args: argparse.Namespace) -> dict[str, str]:
    """--policy-option pairs plus the named MLFQ flags, as one mapping."""
    options = {}
    for item in args.policy_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--policy-option: expected KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    named = {
        "base_quantum_s": args.base_quantum_ms and args.base_quantum_ms / 1000,
        "quantum_ratio": args.quantum_ratio,
        "num_queues": args.num_queues,
        "starvation_s": args.starvation_ms and args.starvation_ms / 1000,
    }
    options.update({k: str(v) for k, v in named.items() if v is not None})
    return options


def policy_argv(args: argparse.Namespace) -> list[str]:
    """The policy flags of `args` as a command line for `fastserve scheduler`."""
    argv = ["--policy", args.policy, "--profile-dir", args.profile_dir]
    for item in args.policy_option:
        argv += ["--policy-option", item]
    for name in _NAMED:
        value = getattr(args, name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv
