"""Incremental detokenization and stop strings, on SmolLM2's real byte-level BPE tokenizer."""

import pytest

from services.frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from services.frontend.tokenizer import encode_prompt

TEXTS = [
    "Hello, world! How are you today?",
    "日本語のテキストと絵文字 🎉🚀 mixed with English.",
    "Ünïcödé àccents, Ελληνικά, русский, עברית, العربية",
    "  leading spaces\n\ttabs and\nnewlines  ",
    "emoji family: 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_one_token_at_a_time_reproduces_the_text(tiny_tokenizer, text):
    prompt_ids = encode_prompt(tiny_tokenizer, "Say:")
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tiny_tokenizer, prompt_ids)
    pieces = [detok.add([token]) for token in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=True)
    # No piece ever shows half a character.
    assert all("\ufffd" not in piece for piece in pieces)


def test_multibyte_character_is_held_until_complete(tiny_tokenizer):
    ids = tiny_tokenizer("🎉", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    detok = IncrementalDetokenizer(tiny_tokenizer, [])
    pieces, holding = [], []
    for token in ids:
        pieces.append(detok.add([token]))
        holding.append(detok.holding)
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🎉"
    assert holding == [True] * (len(ids) - 1) + [False]


def test_a_special_token_adds_no_text_and_holds_nothing(tiny_tokenizer):
    detok = IncrementalDetokenizer(tiny_tokenizer, [])
    assert detok.add(tiny_tokenizer("Hi", add_special_tokens=False)["input_ids"]) == "Hi"
    assert detok.add([tiny_tokenizer.eos_token_id]) == ""
    assert not detok.holding
    assert detok.add(tiny_tokenizer(" there", add_special_tokens=False)["input_ids"]) == " there"


def test_tokens_added_in_groups_give_the_same_text(tiny_tokenizer):
    ids = tiny_tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tiny_tokenizer, [])
    text = "".join(detok.add(ids[i : i + 3]) for i in range(0, len(ids), 3)) + detok.flush()
    assert text == TEXTS[1]


def test_stop_string_split_across_deltas_is_never_shown():
    matcher = StopStringMatcher(["STOP"])
    shown = [matcher.feed(d) for d in ["abc S", "T", "OP and more"]]
    assert "".join(shown) == "abc "
    assert matcher.stopped
    assert matcher.feed("later") == ""


def test_partial_stop_prefix_is_released_when_it_does_not_match():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("xxST") == "xx"
    assert matcher.feed("AY") == "STAY"
    assert matcher.feed("", final=True) == ""
    assert not matcher.stopped


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["world", "lo"])
    assert matcher.feed("hello world", final=True) == "hel"
    assert matcher.stopped


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("abc") == "abc"
    assert matcher.feed("d", final=True) == "d"
