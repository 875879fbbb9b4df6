"""MemoryBackend and the key/meta dataclasses, with no gRPC."""

from __future__ import annotations

import threading

import pytest

from services.kvstore.backend import (
    BlockKey,
    FieldError,
    MemoryBackend,
    StoreFullError,
    TensorMeta,
)


def make_key(job_id: str = "job-1", stage_index: int = 0, block_id: int = 0) -> BlockKey:
    return BlockKey(job_id=job_id, stage_index=stage_index, block_id=block_id)


def make_value(num_bytes: int, fill: int = 7) -> tuple[TensorMeta, bytes]:
    """A uint8 value of `num_bytes`, filled with a pattern that depends on `fill`."""
    meta = TensorMeta(dtype="uint8", shape=(num_bytes,), total_bytes=num_bytes)
    return meta, bytes((fill + i) % 256 for i in range(num_bytes))


def test_meta_accepts_consistent_shape_and_dtype() -> None:
    meta = TensorMeta(dtype="bfloat16", shape=[2, 16, 4, 8], total_bytes=2 * 16 * 4 * 8 * 2)
    assert meta.shape == (2, 16, 4, 8)
    assert TensorMeta(dtype="float32", shape=(), total_bytes=4).total_bytes == 4


@pytest.mark.parametrize(
    ("dtype", "shape", "total_bytes", "field"),
    [
        ("float12", (4,), 6, "dtype"),
        ("float16", (4,), 6, "shape"),
        ("float32", (2, 3), 12, "shape"),
        ("int8", (-1,), 0, "shape"),
    ],
)
def test_meta_rejects_inconsistent_fields(dtype, shape, total_bytes, field) -> None:
    with pytest.raises(FieldError) as info:
        TensorMeta(dtype=dtype, shape=shape, total_bytes=total_bytes)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("job_id", "stage_index", "block_id", "field"),
    [("", 0, 0, "job_id"), ("j", -1, 0, "stage_index"), ("j", 0, -2, "block_id")],
)
def test_key_rejects_bad_fields(job_id, stage_index, block_id, field) -> None:
    with pytest.raises(FieldError) as info:
        BlockKey(job_id=job_id, stage_index=stage_index, block_id=block_id)
    assert info.value.field == field


def test_put_get_round_trip_and_miss() -> None:
    backend = MemoryBackend(capacity_bytes=1024)
    meta, data = make_value(100)
    backend.put(make_key(), meta, data)

    assert backend.get(make_key()) == (meta, data)
    assert backend.get(make_key(block_id=1)) is None
    stats = backend.stats()
    assert (stats.num_entries, stats.used_bytes, stats.capacity_bytes) == (1, 100, 1024)
    assert (stats.num_puts, stats.num_gets, stats.num_misses) == (1, 2, 1)
    assert (stats.bytes_in, stats.bytes_out) == (100, 100)
    assert stats.backend == "memory"


def test_put_copies_a_mutable_buffer() -> None:
    backend = MemoryBackend(capacity_bytes=1024)
    meta, data = make_value(8)
    buffer = bytearray(data)
    backend.put(make_key(), meta, buffer)
    buffer[0] ^= 0xFF

    assert backend.get(make_key()) == (meta, data)


def test_put_rejects_data_of_the_wrong_length() -> None:
    backend = MemoryBackend(capacity_bytes=1024)
    meta, data = make_value(8)
    with pytest.raises(ValueError, match="total_bytes"):
        backend.put(make_key(), meta, data[:-1])
    assert backend.stats().num_entries == 0


def test_capacity_refuses_and_counts_rejections() -> None:
    backend = MemoryBackend(capacity_bytes=100)
    backend.put(make_key(block_id=0), *make_value(60))
    with pytest.raises(StoreFullError):
        backend.put(make_key(block_id=1), *make_value(41))
    with pytest.raises(StoreFullError):
        backend.check_put(make_key(block_id=1), 41)
    backend.check_put(make_key(block_id=1), 40)
    backend.put(make_key(block_id=1), *make_value(40))

    stats = backend.stats()
    assert (stats.num_entries, stats.used_bytes) == (2, 100)
    assert (stats.num_puts, stats.num_rejected_puts) == (2, 2)
    assert backend.get(make_key(block_id=1)) is not None


def test_replacing_a_value_frees_its_old_bytes() -> None:
    backend = MemoryBackend(capacity_bytes=100)
    backend.put(make_key(), *make_value(80))
    new_meta, new_data = make_value(90, fill=3)
    backend.put(make_key(), new_meta, new_data)

    assert backend.get(make_key()) == (new_meta, new_data)
    assert (backend.stats().num_entries, backend.stats().used_bytes) == (1, 90)


def test_delete_and_delete_job() -> None:
    backend = MemoryBackend(capacity_bytes=1024)
    for stage_index in range(2):
        for block_id in range(3):
            backend.put(make_key("a", stage_index, block_id), *make_value(10))
    backend.put(make_key("b"), *make_value(10))

    assert backend.delete(make_key("a", 1, 2)) is True
    assert backend.delete(make_key("a", 1, 2)) is False
    assert backend.delete_job("a") == 5
    assert backend.delete_job("a") == 0
    assert backend.get(make_key("a", 0, 0)) is None
    assert backend.get(make_key("b")) is not None
    assert (backend.stats().num_entries, backend.stats().used_bytes) == (1, 10)


def test_readers_never_see_half_a_write() -> None:
    backend = MemoryBackend(capacity_bytes=1 << 20)
    key = make_key()
    values = [make_value(4096, fill=fill) for fill in range(4)]
    backend.put(key, *values[0])
    stop = threading.Event()
    seen: list[tuple[TensorMeta, bytes]] = []

    def read() -> None:
        while not stop.is_set():
            value = backend.get(key)
            assert value is not None
            seen.append(value)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    for round_index in range(200):
        backend.put(key, *values[round_index % len(values)])
    stop.set()
    for reader in readers:
        reader.join()

    assert seen
    assert all(value in values for value in seen)
    assert backend.stats().used_bytes == 4096
