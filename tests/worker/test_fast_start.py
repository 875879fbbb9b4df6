"""Fast start: models are built without torch's own init, dummy weights are drawn per parameter
on the target device with transformers' statistics (the same for a layer whichever stage holds
it), and a folder's tensors are read only where the stage needs them."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config

from services.common.model_source import load_model, resolve_model
from services.worker.models.llama import LlamaForServing
from services.worker.models.loader import (
    build_model,
    empty_model,
    load_serving_model,
    random_weights,
    safetensors_weights,
)
from testing.tiny_model import tiny_llama_config


def _count_torch_init(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records torch's init functions called on real (not meta) tensors."""
    calls: list[str] = []
    for name in ("kaiming_uniform_", "uniform_", "normal_"):
        original = getattr(torch.nn.init, name)

        def counted(tensor, *args, _original=original, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            if not tensor.is_meta:  # on the meta device an init writes nothing
                calls.append(_name)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, counted)
    return calls


def test_models_are_built_without_torch_init(monkeypatch, tiny_model_dir):
    calls = _count_torch_init(monkeypatch)
    source = resolve_model(str(tiny_model_dir))
    for load_format in ("auto", "dummy"):
        load_serving_model(
            source, layers=None, dtype=torch.float32, device="cpu", load_format=load_format
        )
    assert calls == []
    LlamaForServing(tiny_llama_config(64))  # the plain constructor still initialises
    assert calls


def test_an_empty_model_keeps_the_tied_head_and_the_rotary_table():
    config = tiny_llama_config(64, tie_word_embeddings=True)
    model = empty_model(config, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    reference = LlamaForServing(config, dtype=torch.bfloat16)
    assert torch.equal(model.rotary.cos, reference.rotary.cos)
    assert torch.equal(model.rotary.sin, reference.rotary.sin)


def test_pipeline_stages_draw_the_same_dummy_weights_as_the_whole_model():
    config = tiny_llama_config(96, tie_word_embeddings=True)
    whole = build_model(config, None, layers=None, dtype=torch.float32, device="cpu", seed=3)
    first = build_model(config, None, layers=range(0, 1), dtype=torch.float32, device="cpu", seed=3)
    last = build_model(config, None, layers=range(1, 4), dtype=torch.float32, device="cpu", seed=3)
    assert torch.equal(first.embed_tokens.weight, whole.embed_tokens.weight)
    assert torch.equal(first.layers[0].mlp.down_proj.weight, whole.layers[0].mlp.down_proj.weight)
    for local, layer in enumerate(last.layers):
        expected = whole.layers[local + 1]
        assert torch.equal(layer.self_attn.qkv_proj.weight, expected.self_attn.qkv_proj.weight)
        assert torch.equal(layer.mlp.gate_up_proj.weight, expected.mlp.gate_up_proj.weight)
    # The tied head of the last stage is the whole model's embedding.
    assert torch.equal(last.lm_head.weight, whole.embed_tokens.weight)
    # Parameters draw apart from each other.
    assert not torch.equal(
        whole.layers[0].mlp.down_proj.weight, whole.layers[1].mlp.down_proj.weight
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dummy_weights_have_transformers_statistics_in_the_target_dtype(dtype):
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.05,
    )
    model = build_model(config, None, layers=None, dtype=dtype, device="cpu", seed=0)
    for name, param in model.named_parameters():
        assert param.dtype == dtype, name
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:
            values = param.detach().float()
            assert float(values.mean()) == pytest.approx(0.0, abs=0.005), name
            assert float(values.std()) == pytest.approx(0.05, rel=0.05), name
    assert any(name.endswith("qkv_proj.bias") for name, _ in model.named_parameters())


def test_random_weights_use_a_generator_on_the_weights_device(monkeypatch):
    devices: list[torch.device] = []
    original = torch.Generator

    def recording(device="cpu"):  # type: ignore[no-untyped-def]
        devices.append(torch.device(device))
        return original(device=device)

    monkeypatch.setattr(torch, "Generator", recording)
    model = empty_model(tiny_llama_config(64), dtype=torch.float32)
    random_weights(model, seed=0)
    assert devices == [torch.device("cpu")]


def test_a_stage_reads_only_its_own_tensors(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir))
    whole = load_serving_model(source, layers=None, dtype=torch.float32, device="cpu")
    last = load_serving_model(source, layers=range(2, 4), dtype=torch.float32, device="cpu")
    from services.worker.models.loader import _needed_by

    read = [name for name, _ in safetensors_weights(source.directory, "cpu", _needed_by(last))]
    assert read and not any(
        name.startswith(("model.layers.0.", "model.layers.1.")) for name in read
    )
    assert any(name.startswith("model.layers.3.") for name in read)
    assert torch.equal(last.layers[1].mlp.down_proj.weight, whole.layers[3].mlp.down_proj.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weights_are_drawn_and_read_on_the_gpu(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir))
    dummy = [
        load_serving_model(
            source, layers=None, dtype=torch.bfloat16, device="cuda", load_format="dummy", seed=1
        )
        for _ in range(2)
    ]
    assert all(p.is_cuda for p in dummy[0].parameters())
    assert torch.equal(
        dummy[0].layers[0].mlp.down_proj.weight, dummy[1].layers[0].mlp.down_proj.weight
    )
    real = load_serving_model(source, layers=None, dtype=torch.float32, device="cuda")
    cpu = load_serving_model(source, layers=None, dtype=torch.float32, device="cpu")
    assert torch.equal(
        real.layers[1].self_attn.qkv_proj.weight.cpu(), cpu.layers[1].self_attn.qkv_proj.weight
    )
    hf = load_model(source, dtype=torch.float32, device="cuda", load_format="dummy")
    assert next(hf.parameters()).is_cuda
