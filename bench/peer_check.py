"""The greedy check that runs before anything is timed: every server must give the first
FastServe's text for a few prompts at temperature 0, so a peer that loaded the weights wrongly
(empty or garbage text, another model) stops the run."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from bench.peer_servers import ServerError

# -- the greedy check


@dataclass(frozen=True, slots=True)
class GreedyAnswer:
    text: str
    tokens: tuple[str, ...]  # the server's per-token texts (completions logprobs), if it gave them
    num_tokens: int  # usage.completion_tokens


@dataclass(frozen=True, slots=True)
class GreedyComparison:
    server: str
    prompt: str
    reference: GreedyAnswer
    answer: GreedyAnswer
    agreed_tokens: int  # leading reference tokens the answer reproduces

    @property
    def identical(self) -> bool:
        return self.answer.text == self.reference.text


class GreedyMismatch(RuntimeError):
    """A server's greedy text differs from the reference's too early (or is empty/garbage)."""


def greedy_answer(url: str, model: str, prompt: str, num_tokens: int) -> GreedyAnswer:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": num_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
    }
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(f"{url}/v1/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise ServerError(f"{url}: HTTP {error.code}: {error.read()[:300]!r}") from None
    choice = answer["choices"][0]
    tokens = tuple((choice.get("logprobs") or {}).get("tokens") or ())
    return GreedyAnswer(choice["text"], tokens, int(answer["usage"]["completion_tokens"]))


def agreed_tokens(reference: GreedyAnswer, text: str) -> int:
    """How many leading reference tokens `text` reproduces (by text: servers spell token strings
    differently, so only the reference's own split into tokens is used)."""
    if text == reference.text:
        return reference.num_tokens
    common = next(
        (i for i, (a, b) in enumerate(zip(reference.text, text, strict=False)) if a != b),
        min(len(reference.text), len(text)),
    )
    count, position = 0, 0
    for token in reference.tokens:
        position += len(token)
        if position > common:
            break
        count += 1
    return count


def is_garbage(text: str) -> bool:
    """Empty, blank, or mostly replacement / control characters."""
    if not text.strip():
        return True
    bad = sum(1 for c in text if c == "\ufffd" or (ord(c) < 32 and c not in "\n\t\r"))
    return bad * 2 >= len(text)


def check_greedy(
    label: str,
    answers: list[GreedyAnswer],
    reference_label: str,
    reference: list[GreedyAnswer],
    prompts: Sequence[str],
    num_tokens: int,
    min_agree: int,
) -> list[GreedyComparison]:
    """Compares a server's answers with the reference's; raises `GreedyMismatch` on empty or
    garbage text, a wrong token count (ignore_eos not honoured), or a mismatch within the first
    `min_agree` tokens. Later mismatches (float rounding at a near-tie) are returned, not raised."""
    comparisons = []
    for prompt, ref, answer in zip(prompts, reference, answers, strict=True):
        for who, got in ((reference_label, ref), (label, answer)):
            if is_garbage(got.text):
                raise GreedyMismatch(f"{who} answered {got.text!r} to {prompt!r}: empty or garbage")
            if got.num_tokens != num_tokens:
                raise GreedyMismatch(
                    f"{who} generated {got.num_tokens} tokens for {prompt!r}, not {num_tokens} "
                    "(does it honour ignore_eos?)"
                )
        comparison = GreedyComparison(label, prompt, ref, answer, agreed_tokens(ref, answer.text))
        if comparison.agreed_tokens < min(min_agree, num_tokens):
            raise GreedyMismatch(
                f"{label} and {reference_label} disagree at greedy token "
                f"{comparison.agreed_tokens + 1} of {prompt!r}: {answer.text!r} vs {ref.text!r} "
                "(the same weights at temperature 0 should give the same text: a peer that "
                "loaded the model wrongly?)"
            )
        comparisons.append(comparison)
    return comparisons
