"""Token ids to text as they arrive, and stop strings.

IncrementalDetokenizer decodes a sliding window of ids and emits only text that can no longer
change: a character split over several byte-level tokens is held back until complete (the
replacement character U+FFFD marks an incomplete one). Same scheme as vLLM and TGI.
StopStringMatcher holds back only a tail that could still become a stop string, so a client never
sees part of a stop string.

These two holds are the only reasons a generated token's text is not shown as soon as the token
arrives (the generation core gives every other token a delta of its own; see
`GenerationCore.generate`).
"""

from __future__ import annotations

from collections.abc import Sequence

# Prompt ids kept as left context, so the first output token decodes with the right spacing.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # True while the ids added last end in an incomplete character (their text held back).
        self.holding = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: Sequence[int]) -> str:
        """Appends ids; returns the newly completed text (maybe empty)."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # The bytes of a character split over several tokens: hold them until it completes.
        self.holding = new_text.endswith("\ufffd")
        if self.holding or len(new_text) <= len(prefix_text):
            return ""  # held back, or nothing new (a special token, skipped)
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        self.holding = False
        return new_text[len(prefix_text) :]


class StopStringMatcher:
    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._text = ""
        self._emitted = 0
        self.stopped = False

    def feed(self, delta: str, final: bool = False) -> str:
        """Adds generated text; returns what may be shown now. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        search_from = max(0, len(self._text) - self._hold)
        self._text += delta
        cut = min(
            (i for s in self._stop if (i := self._text.find(s, search_from)) >= 0),
            default=-1,
        )
        if cut >= 0:
            self.stopped = True
            end = cut
        elif final:
            end = len(self._text)
        else:
            end = max(self._emitted, len(self._text) - self._held_back())
        out = self._text[self._emitted : end]
        self._emitted = end
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        for size in range(min(self._hold, len(self._text)), 0, -1):
            tail = self._text[-size:]
            if any(stop.startswith(tail) for stop in self._stop):
                return size
        return 0
