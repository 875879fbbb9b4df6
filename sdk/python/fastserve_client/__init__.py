"""FastServe Python client: sync `Client`, asyncio `AsyncClient`, typed errors."""

from fastserve_client.aio import AsyncClient
from fastserve_client.client import DEFAULT_ADDRESS, Client
from fastserve_client.errors import (
    AuthenticationError,
    CancelledError,
    DeadlineExceededError,
    FastServeError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from fastserve_client.types import ChatMessage, Chunk, Completion, ModelInfo, TokenLogprob, Usage

__all__ = [
    "DEFAULT_ADDRESS",
    "AsyncClient",
    "AuthenticationError",
    "CancelledError",
    "ChatMessage",
    "Chunk",
    "Client",
    "Completion",
    "DeadlineExceededError",
    "FastServeError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "ResourceExhaustedError",
    "TokenLogprob",
    "UnavailableError",
    "Usage",
]
