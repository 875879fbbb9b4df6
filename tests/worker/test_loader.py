"""Weights into the serving model: straight from a folder's safetensors, per pipeline stage,
from a model transformers loaded, tied heads saved under either name, and refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from services.common.model_source import resolve_model
from services.worker.models.llama import LlamaForServing
from services.worker.models.loader import (
    build_model,
    from_hf,
    load_serving_model,
    load_weights,
)
from testing.tiny_model import tiny_llama_config


def _tensors(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.named_parameters()}


def test_a_folder_loads_like_transformers_stage_by_stage(tiny_model_dir, tiny_hf_model):
    whole = from_hf(tiny_hf_model)
    source = resolve_model(str(tiny_model_dir))
    first = load_serving_model(source, layers=range(0, 1), dtype=torch.float32, device="cpu")
    last = load_serving_model(source, layers=range(1, 4), dtype=torch.float32, device="cpu")
    expected = _tensors(whole)
    for name, tensor in _tensors(first).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    for name, tensor in _tensors(last).items():  # layers are numbered within the stage
        if name.startswith("layers."):
            index, rest = name.split(".", 2)[1:]
            name = f"layers.{int(index) + 1}.{rest}"
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    hf_q = tiny_hf_model.model.layers[2].self_attn.q_proj.weight
    torch.testing.assert_close(last.layers[1].self_attn.qkv_proj.weight[: hf_q.shape[0]], hf_q)


def test_a_tied_head_saved_under_either_name(tmp_path):
    config = tiny_llama_config(64, tie_word_embeddings=True, num_hidden_layers=2)
    model = LlamaForServing(config)
    torch.nn.init.normal_(model.embed_tokens.weight)
    tensors = {f"model.{name}": t for name, t in _tensors(model).items()}
    head = tensors.pop("model.embed_tokens.weight")
    for key in ("lm_head.weight", "model.embed_tokens.weight"):  # GGUF conversions: lm_head
        save_file({**tensors, key: head}, str(tmp_path / "model.safetensors"))
        whole = build_model(config, tmp_path, layers=None, dtype=torch.float32, device="cpu")
        assert whole.lm_head.weight is whole.embed_tokens.weight
        torch.testing.assert_close(whole.embed_tokens.weight, head)
        last = build_model(config, tmp_path, layers=range(1, 2), dtype=torch.float32, device="cpu")
        assert last.embed_tokens is None
        torch.testing.assert_close(last.lm_head.weight, head)


def test_missing_or_misshapen_tensors_are_refused(tiny_hf_model):
    state = dict(tiny_hf_model.state_dict())
    model = LlamaForServing(tiny_hf_model.config)
    without_v = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.v_proj.weight"}
    with pytest.raises(ValueError, match=r"lacks layers\.1\.self_attn\.qkv_proj\.weight"):
        load_weights(model, without_v.items())
    bad = {**state, "model.norm.weight": torch.ones(3)}
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape"):
        load_weights(model, bad.items())
    with pytest.raises(ValueError, match="not a Llama-family weight"):
        load_weights(model, [("transformer.h.0.attn.c_attn.weight", torch.ones(1))])


def test_dummy_weights_are_seeded_and_unsupported_families_named(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir))
    a, b, c = (
        load_serving_model(
            source, layers=None, dtype=torch.float32, device="cpu", load_format="dummy", seed=s
        )
        for s in (0, 0, 1)
    )
    assert torch.equal(a.layers[0].mlp.down_proj.weight, b.layers[0].mlp.down_proj.weight)
    assert not torch.equal(a.layers[0].mlp.down_proj.weight, c.layers[0].mlp.down_proj.weight)
    assert torch.equal(a.norm.weight, torch.ones_like(a.norm.weight))
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        LlamaForServing(GPT2Config())
