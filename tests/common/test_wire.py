import pytest

from fastserve.v1 import generation_pb2 as pb
from services.common.wire import find_invalid_utf8

DESCRIPTOR = pb.GenerateRequest.DESCRIPTOR


def test_valid_message_has_no_bad_field():
    request = pb.GenerateRequest(
        prompt="héllo", stop=["a", "b"], max_tokens=3, chat=None
    ).SerializeToString()
    assert find_invalid_utf8(DESCRIPTOR, request) is None


def test_names_a_top_level_string_field():
    assert find_invalid_utf8(DESCRIPTOR, b"\x12\x02\xff\xfe") == "prompt"


def test_names_a_repeated_field_with_its_index():
    stops = b"\x4a\x01a" + b"\x4a\x01\x80"  # stop[0] = "a", stop[1] = invalid
    assert find_invalid_utf8(DESCRIPTOR, stops) == "stop[1]"


def test_names_a_nested_field():
    good = pb.ChatMessage(role="user", content="ok").SerializeToString()
    bad = b"\x0a\x04user\x12\x01\xc3"
    chat = b"\x0a" + bytes([len(good)]) + good + b"\x0a" + bytes([len(bad)]) + bad
    request = b"\x1a" + bytes([len(chat)]) + chat
    assert find_invalid_utf8(DESCRIPTOR, request) == "chat.messages[1].content"


def test_garbage_is_a_value_error():
    with pytest.raises(ValueError):
        find_invalid_utf8(DESCRIPTOR, b"\x12")
