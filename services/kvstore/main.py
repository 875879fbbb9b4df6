"""Entry point of the kvstore: `python -m services.kvstore.main` or `fastserve kvstore`."""

from __future__ import annotations

import argparse
import logging

import redis

from services.common.flags import add_flag
from services.common.grpc_server import add_reuse_port_flag
from services.common.lifecycle import (
    GRACE_S,
    announce_ready,
    catch_stop_signals,
    run_until_signal,
)
from services.common.logs import LOG_LEVELS, setup_logging
from services.kvstore.backend import KVBackend, MemoryBackend
from services.kvstore.redis_backend import DEFAULT_PREFIX, RedisBackend, redact_url
from services.kvstore.server import serve
from services.kvstore.shm import DEFAULT_POOL_LIMIT_BYTES, DEFAULT_SHM_DIR, ShmArea

log = logging.getLogger(__name__)

DEFAULT_PORT = 50071
DEFAULT_CAPACITY_BYTES = 4 * 1024**3
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--host", default="127.0.0.1", help="address to listen on")
    add_flag(parser, "--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one")
    add_reuse_port_flag(parser)
    add_flag(
        parser,
        "--capacity-bytes",
        type=int,
        default=DEFAULT_CAPACITY_BYTES,
        help="most bytes of KV blocks held; puts beyond it are refused",
    )
    add_flag(
        parser,
        "--backend",
        default="memory",
        help="where blocks live: 'memory' (this process) or a Redis URL redis://host:port/db",
    )
    add_flag(
        parser,
        "--redis-prefix",
        default=DEFAULT_PREFIX,
        help="namespace of this store's keys in Redis",
    )
    add_flag(
        parser,
        "--shm-dir",
        default=DEFAULT_SHM_DIR,
        help="tmpfs directory for the same-host shared-memory fast path; empty turns it off",
    )
    add_flag(
        parser,
        "--shm-pool-bytes",
        type=int,
        default=DEFAULT_POOL_LIMIT_BYTES,
        help="most bytes of released shm files kept to be filled again (faster than new ones)",
    )
    add_flag(parser, "--log-level", default="info", choices=LOG_LEVELS, help="log verbosity")


def make_backend(spec: str, capacity_bytes: int, redis_prefix: str = DEFAULT_PREFIX) -> KVBackend:
    """`memory` or a Redis URL; ValueError for anything else, redis.RedisError when the Redis
    cannot be reached."""
    if spec == "memory":
        return MemoryBackend(capacity_bytes)
    if spec.startswith(REDIS_SCHEMES):
        return RedisBackend(spec, capacity_bytes, prefix=redis_prefix)
    raise ValueError(f"--backend must be 'memory' or a redis:// URL, got {spec!r}")


def run(args: argparse.Namespace) -> int:
    setup_logging("kvstore", args.log_level)
    if args.capacity_bytes < 0:
        log.error("--capacity-bytes must be >= 0, got %d", args.capacity_bytes)
        return 2
    try:
        backend = make_backend(args.backend, args.capacity_bytes, args.redis_prefix)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    except redis.RedisError as exc:
        log.error("cannot reach redis at %s: %s", redact_url(args.backend), exc)
        return 2
    shm = None
    if args.shm_dir:
        try:
            shm = ShmArea(args.shm_dir, pool_limit_bytes=max(0, args.shm_pool_bytes))
        except OSError as exc:
            log.warning("shared-memory fast path off: %s", exc)
    try:
        server, port = serve(
            f"{_url_host(args.host)}:{args.port}",
            args.capacity_bytes,
            backend=backend,
            shm=shm,
            reuse_port=args.reuse_port,
        )
    except BaseException:
        _close(backend, shm)
        raise
    log.info(
        "backend %s, shm %s",
        redact_url(args.backend),
        shm.directory if shm else "off",
    )
    catch_stop_signals()
    announce_ready("kvstore", f"{_url_host(args.host)}:{port}")

    def stop() -> None:
        server.stop(GRACE_S).wait()
        _close(backend, shm)

    return run_until_signal("kvstore", stop)


def _close(backend: KVBackend, shm: ShmArea | None) -> None:
    """Frees what outlives the process otherwise: shared-memory files, connections."""
    backend.close()
    if shm is not None:
        shm.close()


def _url_host(host: str) -> str:
    """Brackets an IPv6 literal so a port can follow it."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def main() -> int:
    parser = argparse.ArgumentParser(prog="fastserve kvstore", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
