"""The model's tokenizer as the frontend uses it: prompts to token ids, and stop tokens."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidArgumentError
from services.common.model_source import ModelSource, load_serving_limits, load_tokenizer


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str
    content: str


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Raw prompt -> ids, with the tokenizer's own special tokens (BOS where it adds one)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_chat(tokenizer, turns: list[ChatTurn]) -> list[int]:
    """Chat messages -> ids through the model's chat template, ending in a generation prompt."""
    messages = [{"role": t.role, "content": t.content} for t in turns]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # template errors (jinja raise_exception) are the caller's
        raise InvalidArgumentError("chat.messages", f"chat template rejected them: {exc}") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class ModelTokenizer:
    """Everything the frontend knows about the served model."""

    source: ModelSource
    tokenizer: object
    stop_token_ids: frozenset[int]  # end-of-sequence tokens
    max_model_len: int
    has_chat_template: bool

    @classmethod
    def load(cls, source: ModelSource) -> ModelTokenizer:
        tokenizer = load_tokenizer(source)
        limits = load_serving_limits(source)
        eos_id = getattr(tokenizer, "eos_token_id", None)
        return cls(
            source=source,
            tokenizer=tokenizer,
            stop_token_ids=limits.eos_token_ids | ({eos_id} if isinstance(eos_id, int) else set()),
            max_model_len=limits.max_model_len,
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        )

    @property
    def name(self) -> str:
        return self.source.name

    def encode_prompt(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def encode_chat(self, turns: list[ChatTurn]) -> list[int]:
        if not self.has_chat_template:
            raise InvalidArgumentError("chat", f"model {self.name} has no chat template")
        return encode_chat(self.tokenizer, turns)
