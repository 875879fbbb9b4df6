"""Every service flag a user may set reaches its service through `fastserve up`."""

from __future__ import annotations

import argparse
import functools
import importlib
import os
from unittest import mock

import pytest

from services.cli import COMMANDS
from services.common.flags import ENV_PREFIX
from services.launcher import PortReservations, plan
from services.launcher import add_arguments as add_launcher_arguments
from services.up_flags import LEFT_OUT, PASSED, WIRED, Passed

SERVICES = ("frontend", "scheduler", "worker", "kvstore")
# Flags that set every WIRED flag of every service in plan()'s output.
WIRING = [
    "--stages", "2", "--metrics", "--base-quantum-ms", "5", "--quantum-ratio", "3",
    "--num-queues", "4", "--starvation-ms", "100", "--policy-option", "charge=whole",
]  # fmt: skip


def parser_of(add_arguments, env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """A parser built in a process whose FASTSERVE_* environment is exactly `env` (flags read
    their variables when they are added)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    with mock.patch.dict(os.environ, {**clean, **(env or {})}, clear=True):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
    return parser


def service_arguments(service: str):
    return importlib.import_module(COMMANDS[service][0]).add_arguments


@functools.cache
def service_parser(service: str) -> argparse.ArgumentParser:
    return parser_of(service_arguments(service))


def service_action(service: str, flag: str) -> argparse.Action:
    return service_parser(service)._option_string_actions[flag]


def service_flags(service: str) -> set[str]:
    """The service's flags, each under its first long name."""
    return {
        next(f for f in action.option_strings if f.startswith("--"))
        for action in service_parser(service)._actions
        if not isinstance(action, argparse._HelpAction)
    }


def planned(argv: list[str]) -> dict[str, list]:
    """plan()'s children of each service, for `fastserve up` parsed from `argv`."""
    args = parser_of(add_launcher_arguments).parse_args(
        ["--grpc-port", "0", "--http-port", "0", *argv]
    )
    ports = PortReservations()
    try:
        children = plan(args, ports)
    finally:
        ports.close()
    return {s: [c for c in children if c.argv[0] == s] for s in SERVICES}


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_flag_is_passed_wired_or_left_out_with_a_reason(service):
    passed = {row.target for row in PASSED if row.service == service}
    wired, left_out = set(WIRED[service]), set(LEFT_OUT[service])
    unclassified = service_flags(service) - passed - wired - left_out
    assert not unclassified, (
        f"fastserve {service} {sorted(unclassified)}: pass them through `fastserve up` (PASSED "
        "in services/up_flags.py), or say why not (WIRED or LEFT_OUT)"
    )
    assert not (passed & wired or passed & left_out or wired & left_out)
    stale = (passed | wired | left_out) - service_flags(service)
    assert not stale, f"fastserve {service} has no {sorted(stale)}"
    assert all(WIRED[service].values()) and all(LEFT_OUT[service].values())


def value_for(row: Passed) -> tuple[list[str], object]:
    """`up` arguments that set `row` to a value no default has, and the value expected."""
    action = service_action(row.service, row.target)
    if isinstance(action, argparse._StoreTrueAction):
        return [row.flag], True
    if isinstance(action, argparse._AppendAction):
        return [row.flag, "k1", row.flag, "k2"], ["k1", "k2"]
    if action.choices:
        ours = (row.kwargs or {}).get("default")
        value = next(c for c in action.choices if c not in (action.default, ours))
        return [row.flag, value], value
    value = {int: 7, float: 0.5}.get(action.type, "x-value")
    return [row.flag, str(value)], value


def test_every_passed_flag_reaches_its_service_as_its_own_parser_reads_it():
    argv, expected = [], []
    for row in PASSED:
        flags, value = value_for(row)
        argv += flags
        expected.append((row, value))
    children = planned(argv)
    for row, value in expected:
        for child in children[row.service]:
            secrets = [a for a in child.argv if a in ("k1", "k2")]
            assert not secrets, f"{child.name}: a secret on the command line"
            parsed = parser_of(service_arguments(row.service), child.env).parse_args(child.argv[1:])
            dest = service_action(row.service, row.target).dest
            assert getattr(parsed, dest) == value, (child.name, row.flag)


def test_unset_passed_flags_leave_the_service_its_own_default():
    children = planned([])
    for row in PASSED:
        if (row.kwargs or {}).get("default") is None:
            for child in children[row.service]:
                assert row.target not in child.argv, (child.name, row.flag)


def test_every_wired_flag_is_set_by_the_launcher():
    children = planned(WIRING)
    for service, flags in WIRED.items():
        argv = {a for child in children[service] for a in child.argv}
        assert set(flags) <= argv, f"{service}: the launcher never sets {set(flags) - argv}"


def test_passed_flags_keep_the_services_defaults_and_choices():
    up = parser_of(add_launcher_arguments)
    for row in PASSED:
        ours = up._option_string_actions[row.flag]
        theirs = service_action(row.service, row.target)
        if ours.default is not None and not isinstance(ours, argparse._StoreTrueAction):
            assert ours.default == theirs.default, row.flag
        assert (ours.choices and tuple(ours.choices)) == (theirs.choices and tuple(theirs.choices))
