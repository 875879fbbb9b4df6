import pytest

from testing.tiny_model import tiny_llama_dir


@pytest.fixture(scope="session")
def tiny_model_dir():
    return tiny_llama_dir()


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model_dir):
    import torch

    from services.common.model_source import load_model, resolve_model

    return load_model(resolve_model(str(tiny_model_dir)), dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from services.common.model_source import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(str(tiny_model_dir)))
