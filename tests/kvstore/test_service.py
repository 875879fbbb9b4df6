"""The kvstore as a real process: `python -m services.kvstore.main`, driven over gRPC."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fastserve.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.kvstore.backend import BlockKey, StoreFullError, TensorMeta
from services.kvstore.client import CHANNEL_OPTIONS, KVStoreClient

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
CAPACITY_BYTES = 64 * MIB
READY_TIMEOUT_S = 15.0
READY_LINE = re.compile(r"kvstore ready on (\S+)")


@dataclass
class KVStoreProcess:
    process: subprocess.Popen[str]
    address: str


def start_kvstore(capacity_bytes: int = CAPACITY_BYTES) -> KVStoreProcess:
    """Starts the service on a free port and waits for its ready line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "services.kvstore.main", "--port", "0"),
            *("--capacity-bytes", str(capacity_bytes), "--log-level", "warning"),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []

    def read_ready_line() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if READY_LINE.search(line):
                return

    reader = threading.Thread(target=read_ready_line, daemon=True)
    reader.start()
    reader.join(READY_TIMEOUT_S)
    match = READY_LINE.search(lines[-1]) if lines else None
    if match is None:
        process.kill()
        pytest.fail(f"kvstore did not announce readiness; stdout: {''.join(lines)!r}")
    return KVStoreProcess(process=process, address=match.group(1))


def stop_kvstore(kvstore: KVStoreProcess) -> int:
    kvstore.process.send_signal(signal.SIGTERM)
    try:
        return kvstore.process.wait(timeout=10)
    finally:
        if kvstore.process.poll() is None:
            kvstore.process.kill()


@pytest.fixture(scope="module")
def kvstore() -> Iterator[KVStoreProcess]:
    kvstore = start_kvstore()
    yield kvstore
    stop_kvstore(kvstore)


@pytest.fixture
def client(kvstore: KVStoreProcess) -> Iterator[KVStoreClient]:
    with KVStoreClient(kvstore.address) as client:
        yield client


@pytest.fixture
def stub(kvstore: KVStoreProcess) -> Iterator[kvstore_pb2_grpc.KVStoreStub]:
    with grpc.insecure_channel(kvstore.address, options=CHANNEL_OPTIONS) as channel:
        yield kvstore_pb2_grpc.KVStoreStub(channel)


def make_value(num_bytes: int, seed: int = 0) -> tuple[TensorMeta, bytes]:
    """A float16 value of random bytes, so a reordered or dropped chunk would show."""
    assert num_bytes % 2 == 0
    data = random.Random(seed).randbytes(num_bytes)
    return TensorMeta(dtype="float16", shape=(num_bytes // 2,), total_bytes=num_bytes), data


def good_put(client: KVStoreClient, job_id: str = "healthy") -> None:
    """A valid request after a bad one: the service still serves."""
    key = BlockKey(job_id=job_id, stage_index=0, block_id=0)
    meta, data = make_value(1024, seed=5)
    assert client.put(key, meta, data) == 1024
    assert client.get(key) == (meta, data)
    assert client.delete(key) is True


def raw_put(stub: kvstore_pb2_grpc.KVStoreStub, chunks: list[kvstore_pb2.PutChunk]) -> None:
    stub.Put(iter(chunks), timeout=10)


def pb_key(job_id: str = "bad") -> kvstore_pb2.BlockKey:
    return kvstore_pb2.BlockKey(job_id=job_id, stage_index=1, block_id=2)


def _meta(num_bytes: int, dtype: str = "uint8") -> kvstore_pb2.TensorMeta:
    return kvstore_pb2.TensorMeta(dtype=dtype, shape=[num_bytes], total_bytes=num_bytes)


def test_multi_chunk_round_trip_is_byte_identical(client: KVStoreClient) -> None:
    key = BlockKey(job_id="round-trip", stage_index=1, block_id=3)
    meta, data = make_value(10 * MIB + 6, seed=1)  # three chunks, the last one short
    before = client.stats()

    assert client.put(key, meta, data) == len(data)
    got = client.get(key)

    assert got is not None
    assert got[0] == meta
    assert got[1] == data
    after = client.stats()
    assert after.num_entries == before.num_entries + 1
    assert after.used_bytes == before.used_bytes + len(data)
    assert after.bytes_in - before.bytes_in == len(data)
    assert after.bytes_out - before.bytes_out == len(data)
    assert client.delete(key) is True


def test_get_streams_chunks_of_at_most_4_mib(client, stub) -> None:
    key = BlockKey(job_id="chunks", stage_index=0, block_id=0)
    meta, data = make_value(9 * MIB, seed=2)
    client.put(key, meta, data)

    chunks = list(stub.Get(kvstore_pb2.BlockKey(job_id="chunks"), timeout=10))

    assert [len(chunk.data) for chunk in chunks] == [4 * MIB, 4 * MIB, 1 * MIB]
    assert [chunk.HasField("meta") for chunk in chunks] == [True, False, False]
    assert list(chunks[0].meta.shape) == [9 * MIB // 2]
    assert client.delete_job("chunks") == 1


def test_unknown_key_is_not_found(client, stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Get(kvstore_pb2.BlockKey(job_id="nobody", stage_index=0, block_id=9)))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    before = client.stats()
    assert client.get(BlockKey(job_id="nobody", stage_index=0, block_id=9)) is None
    after = client.stats()
    assert after.num_misses == before.num_misses + 1


def test_delete_one_key_and_a_whole_job(client: KVStoreClient) -> None:
    keys = [BlockKey("doomed", stage, block) for stage in range(2) for block in range(3)]
    survivor = BlockKey("survivor", 0, 0)
    for index, key in enumerate([*keys, survivor]):
        client.put(key, *make_value(256, seed=index))
    num_entries = client.stats().num_entries

    assert client.delete(keys[0]) is True
    assert client.delete(keys[0]) is False
    assert client.get(keys[0]) is None
    assert client.delete_job("doomed") == 5
    assert client.delete_job("doomed") == 0

    assert all(client.get(key) is None for key in keys)
    assert client.get(survivor) == make_value(256, seed=len(keys))
    assert client.stats().num_entries == num_entries - 6
    assert client.delete_job("survivor") == 1


def test_capacity_limit_is_resource_exhausted_and_counted(client: KVStoreClient) -> None:
    before = client.stats()
    free_bytes = before.capacity_bytes - before.used_bytes
    num_bytes = free_bytes - free_bytes % 2  # float16: an even size that fills the store

    assert client.put(BlockKey("big", 0, 0), *make_value(num_bytes)) == num_bytes
    with pytest.raises(StoreFullError):
        client.put(BlockKey("big", 0, 1), *make_value(4))
    # Larger than the whole store: refused on the first chunk.
    with pytest.raises(StoreFullError):
        client.put(BlockKey("huge", 0, 0), *make_value(CAPACITY_BYTES + 2))

    after = client.stats()
    assert after.num_rejected_puts == before.num_rejected_puts + 2
    assert after.used_bytes == before.used_bytes + num_bytes
    assert client.get(BlockKey("big", 0, 1)) is None
    assert client.delete_job("big") == 1
    good_put(client)


def test_resource_exhausted_status_code(stub) -> None:
    meta = _meta(CAPACITY_BYTES + 1)
    with pytest.raises(grpc.RpcError) as info:
        raw_put(stub, [kvstore_pb2.PutChunk(key=pb_key("full"), meta=meta, data=b"x")])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


BAD_PUTS = {
    "oversized chunk": (
        "data",
        [kvstore_pb2.PutChunk(key=pb_key(), meta=_meta(5 * MIB), data=bytes(5 * MIB))],
    ),
    "no key on first chunk": ("key", [kvstore_pb2.PutChunk(meta=_meta(4), data=b"abcd")]),
    "no meta on first chunk": ("meta", [kvstore_pb2.PutChunk(key=pb_key(), data=b"abcd")]),
    "empty stream": ("key", []),
    "empty job id": (
        "key.job_id",
        [kvstore_pb2.PutChunk(key=pb_key(""), meta=_meta(4), data=b"abcd")],
    ),
    "fewer bytes than total_bytes": (
        "meta.total_bytes",
        [
            kvstore_pb2.PutChunk(key=pb_key(), meta=_meta(8), data=b"abcd"),
            kvstore_pb2.PutChunk(data=b"ef"),
        ],
    ),
    "more bytes than total_bytes": (
        "meta.total_bytes",
        [
            kvstore_pb2.PutChunk(key=pb_key(), meta=_meta(4), data=b"abc"),
            kvstore_pb2.PutChunk(data=b"de"),
        ],
    ),
    "shape times dtype is not total_bytes": (
        "meta.shape",
        [
            kvstore_pb2.PutChunk(
                key=pb_key(),
                meta=kvstore_pb2.TensorMeta(dtype="float32", shape=[3], total_bytes=6),
                data=bytes(6),
            )
        ],
    ),
    "unknown dtype": (
        "meta.dtype",
        [kvstore_pb2.PutChunk(key=pb_key(), meta=_meta(4, dtype="float7"), data=bytes(4))],
    ),
}


@pytest.mark.parametrize("case", list(BAD_PUTS))
def test_bad_put_is_invalid_argument_naming_the_field(case: str, client, stub) -> None:
    field, chunks = BAD_PUTS[case]
    before = client.stats()

    with pytest.raises(grpc.RpcError) as info:
        raw_put(stub, chunks)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: "), info.value.details()
    after = client.stats()
    assert (after.num_entries, after.used_bytes) == (before.num_entries, before.used_bytes)
    assert client.get(BlockKey("bad", 1, 2)) is None
    good_put(client)


def test_bad_get_and_delete_are_invalid_argument(client, stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Get(kvstore_pb2.BlockKey(job_id=""), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("job_id: ")
    with pytest.raises(grpc.RpcError) as info:
        stub.Delete(kvstore_pb2.DeleteRequest(job_id="", all_blocks=True), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("job_id: ")
    good_put(client)


def test_health_is_serving(kvstore: KVStoreProcess) -> None:
    with grpc.insecure_channel(kvstore.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", "fastserve.kvstore.v1.KVStore"]:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_kvstore_service(kvstore: KVStoreProcess) -> None:
    with grpc.insecure_channel(kvstore.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
    names = {service.name for service in replies[0].list_services_response.service}
    assert "fastserve.kvstore.v1.KVStore" in names
    assert "grpc.health.v1.Health" in names


def test_stats_reports_the_backend_and_capacity(client: KVStoreClient) -> None:
    stats = client.stats()
    assert stats.backend == "memory"
    assert stats.capacity_bytes == CAPACITY_BYTES
    assert stats.num_gets >= stats.num_misses


def test_sigterm_stops_with_exit_code_0() -> None:
    kvstore = start_kvstore(capacity_bytes=MIB)
    with KVStoreClient(kvstore.address) as client:
        good_put(client)
    assert stop_kvstore(kvstore) == 0


def test_put_bytes_and_get_bytes_agree_on_both_paths(client: KVStoreClient) -> None:
    meta, data = make_value(5 * MIB, seed=11)
    for index, use_shm in enumerate([False, None]):  # None: shm when usable, as workers call it
        key = BlockKey("both-paths", 0, index)
        assert client.put_bytes(key, meta, memoryview(data), use_shm=use_shm) == len(data)
        for read_shm in [False, None]:
            got = client.get_bytes(key, use_shm=read_shm)
            assert got is not None and got[0] == meta and got[1] == data
    assert client.get_bytes(BlockKey("both-paths", 0, 9)) is None
    assert client.delete_job("both-paths") == 2


def test_info_reports_backend_capacity_and_chunk_size(client: KVStoreClient) -> None:
    info = client.info()
    assert (info.backend, info.capacity_bytes) == ("memory", CAPACITY_BYTES)
    assert info.max_chunk_bytes == 4 * MIB
    assert info.host_id
    assert client.shm_usable() == (info.shm_dir != "" and os.path.isdir(info.shm_dir))
