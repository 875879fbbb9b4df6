"""RedisBackend against a real redis-server, and the kvstore service with --backend redis://."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest
import redis

from services.kvstore.backend import BlockKey, StoreFullError, TensorMeta
from services.kvstore.client import KVStoreClient
from services.kvstore.redis_backend import RedisBackend, decode_header, encode_header, redact_url
from testing.kvstore_process import run_kvstore_to_exit, start_kvstore, stop_kvstore
from testing.redis_server import free_port, redis_server
from tests.kvstore.conftest import require_redis_server

MIB = 1024 * 1024


def make_key(job_id: str = "job-1", stage_index: int = 0, block_id: int = 0) -> BlockKey:
    return BlockKey(job_id=job_id, stage_index=stage_index, block_id=block_id)


def make_value(
    num_elements: int, dtype: str = "float16", seed: int = 0, shape: tuple[int, ...] | None = None
) -> tuple[TensorMeta, bytes]:
    """Random bytes, so a reordered or truncated payload would show."""
    size = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1}[dtype]
    meta = TensorMeta(dtype=dtype, shape=shape or (num_elements,), total_bytes=num_elements * size)
    return meta, random.Random(seed).randbytes(num_elements * size)


@pytest.fixture
def backend(redis_url: str, redis_prefix: str) -> Iterator[RedisBackend]:
    backend = RedisBackend(redis_url, capacity_bytes=64 * MIB, prefix=redis_prefix)
    yield backend
    backend.close()


def test_round_trip_is_byte_identical_with_dtype_and_shape(backend: RedisBackend) -> None:
    # A KV block group: (k/v, layers, blocks, heads, block size, head dim) of bfloat16, 6 MiB.
    shape = (2, 4, 6, 8, 16, 64)
    big = make_value(2 * 4 * 6 * 8 * 16 * 64, "bfloat16", seed=1, shape=shape)
    small = make_value(100, "float16", seed=2, shape=(2, 50))
    backend.put(make_key(block_id=0), *big)
    backend.put(make_key(block_id=1), *small)

    got_big = backend.get(make_key(block_id=0))
    got_small = backend.get(make_key(block_id=1))

    assert got_big is not None and got_small is not None
    assert got_big[0] == big[0] and got_big[0].shape == shape
    assert got_big[1] == big[1]
    assert got_small == small
    stats = backend.stats()
    assert stats.backend == "redis"
    assert (stats.num_entries, stats.used_bytes) == (2, len(big[1]) + len(small[1]))
    assert (stats.num_puts, stats.num_gets, stats.num_misses) == (2, 2, 0)
    assert (stats.bytes_in, stats.bytes_out) == (stats.used_bytes, stats.used_bytes)


def test_put_accepts_a_memoryview_and_an_empty_value(backend: RedisBackend) -> None:
    meta, data = make_value(1000, "float32", seed=3)
    backend.put(make_key(), meta, memoryview(bytearray(data)))
    empty = TensorMeta(dtype="float16", shape=(0, 8), total_bytes=0)
    backend.put(make_key(block_id=1), empty, b"")

    assert backend.get(make_key()) == (meta, data)
    assert backend.get(make_key(block_id=1)) == (empty, b"")


def test_missing_key_is_a_miss(backend: RedisBackend) -> None:
    assert backend.get(make_key("nobody")) is None
    stats = backend.stats()
    assert (stats.num_gets, stats.num_misses, stats.num_entries) == (1, 1, 0)


JUNK = {
    "random bytes": random.Random(7).randbytes(5000),
    "empty string": b"",
    "wrong magic": b"XXXX" + encode_header(make_value(8)[0])[4:] + bytes(16),
    "truncated payload": encode_header(make_value(8)[0]) + bytes(15),
    "payload too long": encode_header(make_value(8)[0]) + bytes(17),
    "shape disagrees with total_bytes": encode_header(
        TensorMeta(dtype="float16", shape=(8,), total_bytes=16)
    ).replace(b"float16", b"float32")
    + bytes(16),
    "unknown dtype": encode_header(TensorMeta(dtype="float16", shape=(8,), total_bytes=16)).replace(
        b"float16", b"float99"
    )
    + bytes(16),
}


@pytest.mark.parametrize("case", list(JUNK))
def test_corrupted_value_is_a_miss_and_deleted(
    case: str, backend: RedisBackend, redis_client: redis.Redis
) -> None:
    key = make_key()
    backend.put(key, *make_value(1000, seed=4))
    backend.put(make_key(block_id=1), *make_value(10, seed=5))
    redis_client.set(backend.value_key(key), JUNK[case])

    assert backend.get(key) is None
    assert redis_client.exists(backend.value_key(key)) == 0
    stats = backend.stats()
    assert (stats.num_entries, stats.used_bytes, stats.num_misses) == (1, 20, 1)
    assert backend.get(make_key(block_id=1)) == make_value(10, seed=5)
    # The key is usable again.
    backend.put(key, *make_value(4, seed=6))
    assert backend.get(key) == make_value(4, seed=6)


def test_header_round_trip_and_rejections() -> None:
    meta, data = make_value(24, "bfloat16", shape=(2, 3, 4))
    value = encode_header(meta) + data
    assert decode_header(value) == (meta, len(value) - len(data))
    assert all(decode_header(value[:cut]) is None for cut in (0, 3, 16, len(value) - 1))
    assert decode_header(value + b"x") is None


def test_capacity_limit_refuses_and_replacement_frees(redis_url, redis_prefix) -> None:
    backend = RedisBackend(redis_url, capacity_bytes=1000, prefix=redis_prefix)
    backend.put(make_key(block_id=0), *make_value(300))  # 600 bytes
    with pytest.raises(StoreFullError):
        backend.put(make_key(block_id=1), *make_value(201))
    with pytest.raises(StoreFullError):
        backend.check_put(make_key(block_id=1), 401)
    backend.check_put(make_key(block_id=1), 400)
    backend.check_put(make_key(block_id=0), 1000)  # replacing frees the old 600
    backend.put(make_key(block_id=0), *make_value(500, seed=1))  # replaces: 1000 bytes

    stats = backend.stats()
    assert (stats.num_entries, stats.used_bytes) == (1, 1000)
    assert (stats.num_puts, stats.num_rejected_puts) == (2, 2)
    assert backend.get(make_key(block_id=1)) is None
    assert backend.get(make_key(block_id=0)) == make_value(500, seed=1)
    backend.close()


def test_concurrent_puts_never_overshoot_capacity(redis_url, redis_prefix) -> None:
    num_bytes = 64 * 1024
    # Two backends on one prefix: like two kvstores sharing a Redis, plus threads in each.
    backends = [
        RedisBackend(redis_url, capacity_bytes=10 * num_bytes, prefix=redis_prefix)
        for _ in range(2)
    ]
    stored: list[BlockKey] = []
    lock = threading.Lock()

    def put_many(thread_index: int) -> None:
        for block_id in range(5):
            key = make_key(f"job-{thread_index}", 0, block_id)
            try:
                backends[thread_index % 2].put(key, *make_value(num_bytes // 2, seed=block_id))
            except StoreFullError:
                continue
            with lock:
                stored.append(key)

    threads = [threading.Thread(target=put_many, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(stored) == 10
    assert backends[0].stats().used_bytes == 10 * num_bytes
    assert all(backends[1].get(key) is not None for key in stored)
    for backend in backends:
        backend.close()


def test_delete_and_delete_job(backend: RedisBackend) -> None:
    for stage_index in range(2):
        for block_id in range(3):
            backend.put(make_key("a", stage_index, block_id), *make_value(5))
    backend.put(make_key("a:0"), *make_value(5))  # a job id that looks like a key prefix
    backend.put(make_key("b"), *make_value(5))

    assert backend.delete(make_key("a", 1, 2)) is True
    assert backend.delete(make_key("a", 1, 2)) is False
    assert backend.delete_job("a") == 5
    assert backend.delete_job("a") == 0
    assert backend.get(make_key("a", 0, 0)) is None
    assert backend.get(make_key("a:0")) is not None
    assert backend.get(make_key("b")) is not None
    assert (backend.stats().num_entries, backend.stats().used_bytes) == (2, 20)


def test_readers_never_see_half_a_write(backend: RedisBackend) -> None:
    key = make_key()
    values = [make_value(512 * 1024, seed=seed) for seed in range(3)]  # 1 MiB each
    backend.put(key, *values[0])
    stop = threading.Event()
    seen: list[bool] = []

    def read() -> None:
        while not stop.is_set():
            value = backend.get(key)
            seen.append(value in values)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    for round_index in range(30):
        backend.put(key, *values[round_index % len(values)])
    stop.set()
    for reader in readers:
        reader.join()

    assert seen and all(seen)
    assert backend.stats().used_bytes == 1 * MIB


def test_values_evicted_by_redis_are_misses_never_garbage() -> None:
    require_redis_server()
    num_bytes = 256 * 1024
    args = ("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    with redis_server(args) as url:
        backend = RedisBackend(url, capacity_bytes=1 << 30)
        written = {}
        for block_id in range(40):  # 10 MiB into a Redis of 4 MiB
            key = make_key("evicted", 0, block_id)
            written[key] = make_value(num_bytes // 2, seed=block_id)
            backend.put(key, *written[key])

        got = {key: backend.get(key) for key in written}

        hits = [key for key, value in got.items() if value is not None]
        assert len(hits) < len(written)  # some were evicted
        assert all(got[key] == written[key] for key in hits)  # the rest are intact
        stats = backend.stats()
        assert stats.num_misses == len(written) - len(hits)
        # Misses reconciled the accounting; Redis may have evicted the bookkeeping too, so
        # counts may be low, but never above what is still there.
        assert stats.used_bytes <= len(hits) * num_bytes
        assert stats.num_entries <= len(hits)
        # Even when Redis evicted the job's key set, delete_job finds the survivors.
        assert backend.delete_job("evicted") == len(hits)
        assert all(backend.get(key) is None for key in written)
        assert backend.stats().used_bytes == 0
        backend.close()


def test_redis_refusing_for_memory_is_store_full() -> None:
    require_redis_server()
    with redis_server(("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")) as url:
        backend = RedisBackend(url, capacity_bytes=1 << 30)
        with pytest.raises(StoreFullError):
            for block_id in range(40):
                backend.put(make_key(block_id=block_id), *make_value(128 * 1024, seed=block_id))
        assert backend.stats().num_rejected_puts == 1
        backend.close()


def test_unreachable_redis_fails_at_construction() -> None:
    with pytest.raises(redis.ConnectionError):
        RedisBackend(f"redis://127.0.0.1:{free_port()}/0", capacity_bytes=100)


def test_redact_url_hides_the_password() -> None:
    assert redact_url("redis://user:secret@host:6379/1") == "redis://user:***@host:6379/1"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


# The service end to end, through the gRPC client.


@pytest.mark.e2e
def test_kvstore_service_with_redis_backend(redis_url: str, redis_prefix: str) -> None:
    kvstore = start_kvstore(
        *("--backend", redis_url, "--redis-prefix", redis_prefix),
        *("--capacity-bytes", str(16 * MIB), "--shm-dir", "", "--log-level", "warning"),
    )
    try:
        with KVStoreClient(kvstore.address) as client:
            key = BlockKey("e2e", 1, 2)
            meta, data = make_value(5 * MIB // 2, "bfloat16", seed=9)  # 5 MiB: two gRPC chunks
            assert client.put(key, meta, data) == len(data)
            assert client.get(key) == (meta, data)
            assert client.put_bytes(BlockKey("e2e", 1, 3), meta, data) == len(data)
            got = client.get_bytes(BlockKey("e2e", 1, 3))
            assert got is not None and got[0] == meta and bytes(got[1]) == data
            assert client.get(BlockKey("e2e", 1, 4)) is None

            stats = client.stats()
            assert (stats.backend, stats.capacity_bytes) == ("redis", 16 * MIB)
            assert (stats.num_entries, stats.used_bytes) == (2, 10 * MIB)
            assert stats.num_misses == 1
            assert client.info().backend == "redis"

            with pytest.raises(StoreFullError):
                client.put(BlockKey("e2e", 0, 0), *make_value(4 * MIB))
            assert client.delete(key) is True
            assert client.delete_job("e2e") == 1
            assert client.stats().used_bytes == 0
    finally:
        assert stop_kvstore(kvstore) == 0


@pytest.mark.e2e
def test_kvstore_refuses_a_bad_backend_flag() -> None:
    result = run_kvstore_to_exit("--backend", "mongodb://nowhere")
    assert result.returncode == 2
    assert "--backend" in result.stderr + result.stdout
    result = run_kvstore_to_exit("--backend", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 2
    assert "cannot reach redis" in result.stderr + result.stdout
