import pytest
import torch

from services.common.model_source import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    load_model,
    resolve_model,
)


def test_default_name_and_aliases_resolve_to_the_packaged_gguf():
    source = resolve_model(DEFAULT_MODEL)
    assert source.gguf_file and (source.directory / source.gguf_file).is_file()
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == source
    assert source.matches("") and source.matches("smollm2") and not source.matches("other")


def test_a_gguf_path_resolves_to_its_folder_and_file():
    packaged = resolve_model(DEFAULT_MODEL)
    source = resolve_model(str(packaged.directory / packaged.gguf_file))
    assert source.directory == packaged.directory and source.gguf_file == packaged.gguf_file


def test_a_hf_folder_resolves(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir))
    assert source.gguf_file is None and source.name == tiny_model_dir.name


@pytest.mark.parametrize("spec", ["no-such-model", "/nonexistent/model.gguf", "org/remote-model"])
def test_anything_else_is_refused_without_a_download(spec):
    with pytest.raises(ModelNotFoundError, match="model"):
        resolve_model(spec)


def test_dummy_weights_keep_the_config_but_not_the_weights(tiny_model_dir, tiny_hf_model):
    dummy = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.float32, load_format="dummy")
    assert dummy.config.hidden_size == tiny_hf_model.config.hidden_size
    real = tiny_hf_model.model.embed_tokens.weight
    assert dummy.model.embed_tokens.weight.shape == real.shape
    assert not torch.equal(dummy.model.embed_tokens.weight, real)


def test_bfloat16_loading(tiny_model_dir):
    model = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
