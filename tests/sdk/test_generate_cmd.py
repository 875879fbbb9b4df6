"""`fastserve generate` against the scripted double (tests/sdk/scripted.py)."""

from __future__ import annotations

import argparse

import grpc
import pytest

from fastserve.v1 import generation_pb2 as pb
from services import generate_cmd
from tests.sdk.scripted import (
    HELLO,
    Abort,
    state,
)

# --- fastserve generate ------------------------------------------------------------------------


def parse_generate_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("has_chat_template", "flags", "expected_input"),
    [(True, [], "chat"), (False, [], "prompt"), (True, ["--raw"], "prompt")],
)
def test_generate_cmd_picks_chat_or_raw(double, capsys, has_chat_template, flags, expected_input):
    double.models = [pb.ModelCard(name="m", has_chat_template=has_chat_template)]
    double.scripts = [HELLO]
    args = parse_generate_args("Say hello", "--address", double.address, *flags)

    assert generate_cmd.run(args) == 0

    assert capsys.readouterr().out == "Hello\n"
    request = double.requests[0]
    assert request.WhichOneof("input") == expected_input
    if expected_input == "chat":
        assert [(m.role, m.content) for m in request.chat.messages] == [("user", "Say hello")]
    else:
        assert request.prompt == "Say hello"
    assert (request.max_tokens, request.temperature) == (256, 0.0)
    assert request.HasField("temperature")
    assert not request.HasField("top_p")


def test_generate_cmd_passes_options_and_shows_events(double, capsys):
    double.scripts = [[state(pb.JOB_STATE_QUEUED, 1), state(pb.JOB_STATE_PREEMPTED)]]
    double.scripts[0] += [state(pb.JOB_STATE_RUNNING), *HELLO]
    args = parse_generate_args(
        "Say hello",
        *("--address", double.address, "--max-tokens", "9", "--top-k", "4", "--seed", "1"),
        *("--stop", "a", "--stop", "b", "--show-events"),
    )

    assert generate_cmd.run(args) == 0

    captured = capsys.readouterr()
    assert captured.out == "Hello\n"
    assert captured.err.splitlines() == ["[queued at level 1]", "[preempted]", "[resumed]"]
    request = double.requests[0]
    assert (request.max_tokens, request.top_k, request.seed) == (9, 4, 1)
    assert list(request.stop) == ["a", "b"]


def test_generate_cmd_error_prints_details_and_returns_1(double, capsys):
    double.scripts = [[Abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: must be > 0")]]
    args = parse_generate_args("Say hello", "--address", double.address, "--max-tokens", "0")

    assert generate_cmd.run(args) == 1

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: max_tokens: must be > 0\n"


def test_generate_cmd_address_defaults_from_env(monkeypatch):
    monkeypatch.setenv("FASTSERVE_ADDRESS", "10.0.0.1:6000")
    assert parse_generate_args("hi").address == "10.0.0.1:6000"
    monkeypatch.delenv("FASTSERVE_ADDRESS")
    assert parse_generate_args("hi").address == "127.0.0.1:50051"
