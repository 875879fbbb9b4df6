"""Weights into a LlamaForServing: from a Hugging Face folder's safetensors, from a model
transformers loaded (a GGUF the cache could not hold, or a test's model), or random (dummy).

Checkpoint names are Hugging Face's; separate q/k/v and gate/up tensors are written into their
slices of the fused parameters. Only this stage's tensors are read, straight onto the target
device (a safetensors file is memory-mapped, so the others are never touched), and every
parameter must be written exactly once: a missing or unexpected tensor is an error, not silent
random weights. The model is allocated without torch's own init (`empty_model`), which would
write every weight once more on one CPU thread before they are loaded or drawn.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.common.model_source import (
    LOAD_FORMATS,
    ModelSource,
    load_config,
    load_model,
    local_folder,
)
from services.worker.models.layers import RotaryTable
from services.worker.models.llama import LlamaForServing, head_dim, num_kv_heads

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Checkpoint tensors that are not weights (buffers older checkpoints carry).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def load_weights(model: LlamaForServing, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copies checkpoint tensors (HF names) into `model`; raises if any parameter stays unset."""
    params = dict(model.named_parameters())  # a tied LM head appears once, as the embedding
    written: dict[str, set[tuple[int, int]]] = {name: set() for name in params}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in tensors:
        for target, rows in _targets(model, name, tied):
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name}: no parameter {target} in the model")
            rows = rows or (0, param.shape[0])
            destination = param.data[rows[0] : rows[1]]
            if tuple(destination.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                    f"{target} expects {tuple(destination.shape)}"
                )
            destination.copy_(tensor)
            written[target].add(rows)
    missing = [
        name
        for name, parts in written.items()
        if sum(stop - start for start, stop in parts) != params[name].shape[0]
    ]
    if missing:
        raise ValueError(f"the checkpoint lacks {', '.join(sorted(missing)[:8])}")


def _is_tied_alias(model: LlamaForServing) -> bool:
    """Whether the LM head is the embedding itself (a tied model's only stage)."""
    return (
        model.embed_tokens is not None
        and model.lm_head is not None
        and model.lm_head.weight is model.embed_tokens.weight
    )


def _targets(
    model: LlamaForServing, name: str, tied: bool
) -> list[tuple[str, tuple[int, int] | None]]:
    """Where a checkpoint tensor goes: (parameter name, rows of it or None for all of it)."""
    if _IGNORED.search(name):
        return []
    if name == "model.embed_tokens.weight":
        targets: list[tuple[str, tuple[int, int] | None]] = []
        if model.embed_tokens is not None:
            targets.append(("embed_tokens.weight", None))
        if tied and model.lm_head is not None and model.embed_tokens is None:
            targets.append(("lm_head.weight", None))  # the last stage of a tied model
        return targets
    if name == "lm_head.weight":
        if model.lm_head is not None and not _is_tied_alias(model):
            return [("lm_head.weight", None)]
        if tied and model.embed_tokens is not None:  # a tied checkpoint saved under lm_head
            return [("embed_tokens.weight", None)]
        return []
    if name == "model.norm.weight":
        return [("norm.weight", None)] if model.norm is not None else []
    match = _LAYER.match(name)
    if match is None:
        raise ValueError(f"checkpoint tensor {name}: not a Llama-family weight")
    layer, rest = int(match[1]), match[2]
    if layer not in model.layer_range:
        return []
    prefix = f"layers.{layer - model.layer_range.start}."
    config = model.config
    q_rows = config.num_attention_heads * head_dim(config)
    kv_rows = num_kv_heads(config) * head_dim(config)
    fused = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0, q_rows),
        "self_attn.k_proj": ("self_attn.qkv_proj", q_rows, q_rows + kv_rows),
        "self_attn.v_proj": ("self_attn.qkv_proj", q_rows + kv_rows, q_rows + 2 * kv_rows),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0, config.intermediate_size),
        "mlp.up_proj": ("mlp.gate_up_proj", config.intermediate_size, 2 * config.intermediate_size),
    }
    module, _, kind = rest.rpartition(".")
    if module in fused:
        target, start, stop = fused[module]
        return [(f"{prefix}{target}.{kind}", (start, stop))]
    return [(f"{prefix}{rest}", None)]


def safetensors_weights(
    directory: Path,
    device: torch.device | str = "cpu",
    wanted: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a Hugging Face folder's safetensors files that `wanted` accepts (default:
    all), one at a time, read straight onto `device` (safetensors moves each tensor as it reads
    it: no full copy of the checkpoint on the host, and other stages' tensors are never read)."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} holds no safetensors weights")
    for file in files:
        with safe_open(str(directory / file), framework="pt", device=str(device)) as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is no dict)
                if wanted is None or wanted(name):
                    yield name, handle.get_tensor(name)


def _needed_by(model: LlamaForServing) -> Callable[[str], bool]:
    """Whether a checkpoint tensor goes into `model` (a name that is no Llama weight is
    passed on, for load_weights to refuse)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def needed(name: str) -> bool:
        try:
            return bool(_targets(model, name, tied))
        except ValueError:
            return True

    return needed


def empty_model(
    config: PretrainedConfig,
    *,
    layers: range | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LlamaForServing:
    """A LlamaForServing whose parameters are allocated on `device` but not initialised: built on
    the meta device, so nn.Linear's and nn.Embedding's own random init (a full write of every
    weight, on one CPU thread) never runs before the weights are loaded or drawn anyway. The
    caller must write every parameter (load_weights checks; random_weights writes all)."""
    model = LlamaForServing(config, layers=layers, dtype=dtype, device="meta")
    model.to_empty(device=device)
    if _is_tied_config(config) and model.lm_head is not None and model.embed_tokens is not None:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty gives each its own tensor
    model.rotary = RotaryTable(config, dtype=dtype, device=torch.device(device))
    return model


def _is_tied_config(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def from_hf(hf_model: PreTrainedModel, layers: range | None = None) -> LlamaForServing:
    """A serving model holding `layers` of a model transformers loaded, same dtype and device."""
    param = next(hf_model.parameters())
    model = empty_model(hf_model.config, layers=layers, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        load_weights(model, hf_model.state_dict().items())
    return model.eval()


def random_weights(model: LlamaForServing, seed: int = 0) -> None:
    """Dummy weights as transformers initialises a new model: normal(0, initializer_range) for
    matrices and embeddings, ones for norms, zeros for biases. Drawn on the weights' own device
    in their own dtype (a GPU fills an 8B model in a second), so they depend on the device type
    as well as the seed. Each parameter has its own generator, seeded from (seed, its name in
    the whole model), so a pipeline stage draws the same weights for its layers as a worker
    holding the whole model, and the last stage of a tied model draws the embedding as its
    head."""
    device = model.device
    std = getattr(model.config, "initializer_range", 0.02)
    generator = torch.Generator(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                generator.manual_seed(_parameter_seed(seed, _global_name(model, name)))
                param.normal_(0.0, std, generator=generator)


def _global_name(model: LlamaForServing, name: str) -> str:
    """A stage's parameter name as the whole model names it."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"layers.{int(index) + model.layer_range.start}.{rest}"
    if name == "lm_head.weight" and _is_tied_config(model.config):
        return "embed_tokens.weight"
    return name


def _parameter_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes up to 2**63 - 1 on CUDA


def build_model(
    config: PretrainedConfig,
    directory: Path | None,
    *,
    layers: range | None,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
) -> LlamaForServing:
    """The stage's model from a folder's safetensors, or random weights when `directory` is
    None."""
    model = empty_model(config, layers=layers, dtype=dtype, device=device)
    with torch.no_grad():
        if directory is None:
            random_weights(model, seed)
        else:
            load_weights(model, safetensors_weights(directory, device, _needed_by(model)))
    return model.eval()


def load_serving_model(
    source: ModelSource,
    *,
    layers: range | None,
    dtype: torch.dtype,
    device: str,
    load_format: str = "auto",
    seed: int = 0,
) -> LlamaForServing:
    """`--model` as a serving model holding `layers`: a folder's safetensors read directly (a
    GGUF converted once into the model cache first), random weights for `dummy`, or, where a
    GGUF could not be cached, through transformers' GGUF reader."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    folder = local_folder(source, weights=load_format != "dummy")
    config = load_config(folder)
    if load_format == "dummy":
        return build_model(config, None, layers=layers, dtype=dtype, device=device, seed=seed)
    if folder.gguf_file:  # the cache could not be written
        return from_hf(load_model(folder, dtype=dtype, device=device), layers)
    return build_model(config, folder.directory, layers=layers, dtype=dtype, device=device)
