"""OpenAI request parsing, error shapes and API keys, without processes."""

from __future__ import annotations

import argparse

import pytest

from services.common.errors import InvalidArgumentError, ResourceExhaustedError, UnavailableError
from services.frontend import auth
from services.frontend.auth import ApiKeys
from services.frontend.openai_http import error_of
from services.frontend.openai_schema import ApiError, parse_chat, parse_completion, parse_json


def test_completion_defaults_and_extras():
    request = parse_completion(
        {
            "model": "m",
            "prompt": "hi",
            "max_tokens": 5,
            "stop": "x",
            "top_k": -1,
            "ignore_eos": True,
            "priority": 3,
            "seed": 2**64 - 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert request.prompt == "hi" and request.prompt_ids is None
    assert request.sampling.max_tokens == 5
    assert request.sampling.stop == ("x",)
    assert request.sampling.params.top_k == 0
    assert request.sampling.ignore_eos
    assert request.priority == 3
    assert request.stream and request.include_usage


def test_prompt_forms():
    assert parse_completion({"prompt": ["one"]}).prompt == "one"
    assert parse_completion({"prompt": [1, 2, 3]}).prompt_ids == [1, 2, 3]
    with pytest.raises(InvalidArgumentError, match="batched"):
        parse_completion({"prompt": ["a", "b"]})
    with pytest.raises(InvalidArgumentError) as info:
        parse_completion({"prompt": [1, -2]})
    assert info.value.field == "prompt[1]"


def test_chat_messages_and_max_completion_tokens():
    request = parse_chat(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"},
                                             {"type": "text", "text": "b"}]},
            ],
            "max_completion_tokens": 7,
        }
    )  # fmt: skip
    assert [(t.role, t.content) for t in request.messages] == [
        ("system", "be brief"),
        ("user", "ab"),
    ]
    assert request.sampling.max_tokens == 7


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "temperature": float("inf")}, "temperature"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "stop": 3}, "stop"),
        ({"prompt": "x", "stop": ["a", 1]}, "stop[1]"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stream": True, "stream_options": {"x": 1}}, "stream_options.x"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "logprobs": -1}, "logprobs"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "extra": 0}, "extra"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": {}}, "prompt"),
    ],
)
def test_bad_completion_fields_are_named(body, field):
    with pytest.raises(InvalidArgumentError) as info:
        parse_completion(body)
    assert info.value.field == field


@pytest.mark.parametrize(
    "body,field",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x", "tool": 1}]}, "messages[0].tool"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 1}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
             "max_completion_tokens": 2},
            "max_tokens",
        ),
    ],
)  # fmt: skip
def test_bad_chat_fields_are_named(body, field):
    with pytest.raises(InvalidArgumentError) as info:
        parse_chat(body)
    assert info.value.field == field


@pytest.mark.parametrize(
    "raw,words",
    [
        (b"\xff", "UTF-8"),
        (b"{", "invalid JSON"),
        (b"[1]", "JSON object"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": -Infinity}', "Infinity"),
        (b"[" * 100_000, "invalid JSON"),
    ],
)
def test_parse_json_refuses_what_is_not_a_json_object(raw, words):
    with pytest.raises(ApiError) as info:
        parse_json(raw)
    assert info.value.status == 400 and words in info.value.message


def test_errors_map_to_openai_status_and_body():
    error = error_of(InvalidArgumentError("top_p", "must be in (0, 1]"))
    assert error.status == 400
    assert error.body() == {
        "error": {
            "message": "top_p: must be in (0, 1]",
            "type": "invalid_request_error",
            "param": "top_p",
            "code": None,
        }
    }
    assert error_of(ResourceExhaustedError("full")).status == 429
    assert error_of(UnavailableError("gone")).status == 503
    assert error_of(RuntimeError("boom")).status == 500


def keys(monkeypatch, *values: str, env: str = "", file: str | None = None) -> ApiKeys:
    """Keys as `fastserve frontend` gets them: its parser reads FASTSERVE_API_KEY."""
    monkeypatch.delenv("FASTSERVE_API_KEY_FILE", raising=False)
    if env:
        monkeypatch.setenv("FASTSERVE_API_KEY", env)
    else:
        monkeypatch.delenv("FASTSERVE_API_KEY", raising=False)
    parser = argparse.ArgumentParser()
    auth.add_arguments(parser)
    argv = [arg for value in values for arg in ("--api-key", value)]
    return ApiKeys.from_args(parser.parse_args(argv + (["--api-key-file", file] if file else [])))


def test_api_keys_from_flags_env_and_file(tmp_path, monkeypatch):
    assert not keys(monkeypatch).enabled and keys(monkeypatch).allows(None)
    path = tmp_path / "keys"
    path.write_text("# comment\nfile-key\n\n")
    checker = keys(monkeypatch, "flag-key", env="env-a, env-b", file=str(path))
    for key in ["flag-key", "env-a", "env-b", "file-key"]:
        assert checker.allows(f"Bearer {key}"), key
        assert checker.allows(f"bearer {key}"), key
    for header in [None, "", "flag-key", "Basic flag-key", "Bearer wrong", "Bearer "]:
        assert not checker.allows(header), header


def test_api_key_file_variable_alone_turns_keys_on(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text("only-key\n")
    monkeypatch.delenv("FASTSERVE_API_KEY", raising=False)
    monkeypatch.setenv("FASTSERVE_API_KEY_FILE", str(path))
    parser = argparse.ArgumentParser()
    auth.add_arguments(parser)
    checker = ApiKeys.from_args(parser.parse_args([]))
    assert checker.enabled
    assert checker.allows("Bearer only-key")
    assert not checker.allows(None) and not checker.allows("Bearer other")
