"""The tiny Llama, its test prompts and transformers' greedy output for them, shared by the
runner tests (test_model_runner.py, test_cuda_graphs.py)."""

import pytest
import torch

from services.common.model_source import load_model, resolve_model
from testing.oracle import hf_greedy
from testing.tiny_model import tiny_llama_dir
from tests.worker.test_model_runner import NUM_NEW, make_prompts


@pytest.fixture(scope="module")
def llama():
    return load_model(resolve_model(str(tiny_llama_dir())), dtype=torch.float32)


@pytest.fixture(scope="module")
def llama_prompts(llama):
    return make_prompts(llama.config.vocab_size)


@pytest.fixture(scope="module")
def llama_refs(llama, llama_prompts):
    return [hf_greedy(llama, p, NUM_NEW) for p in llama_prompts]
