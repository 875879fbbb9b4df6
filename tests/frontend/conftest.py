"""Fixtures of the frontend's tests: the tiny model's tokenizer, and a dead scheduler address."""

from __future__ import annotations

import socket

import pytest

from services.common.model_source import resolve_model
from services.frontend.tokenizer import ModelTokenizer


@pytest.fixture(scope="session")
def model(tiny_model_dir) -> ModelTokenizer:
    return ModelTokenizer.load(resolve_model(str(tiny_model_dir)))


@pytest.fixture
def nobody():
    """A scheduler address where nothing listens (bound, so no one else takes the port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"
