import os

# Before gRPC loads (conftest.py is imported before any test module): its fork support, on by
# default, re-makes the poller threads of a gRPC server a test ran in every child that a later
# test forks with a preexec_fn (the supervisor's PR_SET_PDEATHSIG), and such a child may abort
# when subprocess closes its descriptors. The launcher itself never starts gRPC: only a test
# process meets this.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import pytest
import torch

# Without CUDA the worker's Triton kernels run in Triton's interpreter, which must be chosen
# before anything imports triton (services/worker/kernels). Child processes inherit it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
