"""The same-host shared-memory fast path, through a real kvstore process and the client."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from fastserve.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.kvstore.backend import BlockKey, StoreFullError, TensorMeta
from services.kvstore.client import CHANNEL_OPTIONS, KVStoreClient, ShmUnavailableError
from services.kvstore.shm import write_file
from testing.kvstore_process import KVStoreProcess, start_kvstore, stop_kvstore

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
CAPACITY_BYTES = 32 * MIB


def make_value(num_bytes: int, dtype: str = "bfloat16", seed: int = 0) -> tuple[TensorMeta, bytes]:
    shape = (2, num_bytes // 4)  # two bytes per element
    data = random.Random(seed).randbytes(num_bytes)
    return TensorMeta(dtype=dtype, shape=shape, total_bytes=num_bytes), data


@pytest.fixture(scope="module")
def shm_dir() -> Iterator[Path]:
    """A directory of its own on a tmpfs, so what is left in it is this module's doing."""
    parent = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="fastserve-test-", dir=parent))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_store(shm_dir: Path, *flags: str, capacity_bytes: int = CAPACITY_BYTES) -> KVStoreProcess:
    return start_kvstore(
        *("--shm-dir", str(shm_dir), "--capacity-bytes", str(capacity_bytes)),
        *("--log-level", "warning", *flags),
    )


@pytest.fixture(scope="module")
def kvstore(shm_dir: Path) -> Iterator[KVStoreProcess]:
    kvstore = start_store(shm_dir)
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


def files(shm_dir: Path, kind: str = "") -> list[str]:
    """Names in the directory; `kind` "c-", "s-" or "h-" picks client, store or handed-out."""
    return sorted(name for name in os.listdir(shm_dir) if kind in name.split("-", 2)[-1][:2])


def good_put(client: KVStoreClient) -> None:
    """A valid shm round trip after a bad request: the store still serves."""
    key = BlockKey("healthy", 0, 0)
    meta, data = make_value(4096, seed=5)
    assert client.put_bytes(key, meta, data, use_shm=True) == 4096
    got = client.get_bytes(key, use_shm=True)
    assert got is not None and got[0] == meta and got[1] == data
    assert client.delete(key) is True


def test_info_describes_the_fast_path(client: KVStoreClient, shm_dir: Path) -> None:
    info = client.info()
    assert info.backend == "memory"
    assert info.capacity_bytes == CAPACITY_BYTES
    assert info.shm_dir == os.path.realpath(shm_dir)
    assert info.shm_client_prefix.startswith("fskv-")
    assert (shm_dir / info.shm_probe_name).read_text() == info.shm_probe_token
    assert info.max_chunk_bytes == 4 * MIB
    assert info.shm_usable_here()
    assert not replace(info, shm_probe_token="other").shm_usable_here()
    assert not replace(info, host_id="another-host").shm_usable_here()
    assert client.shm_usable()


def test_round_trip_is_byte_identical_and_the_store_keeps_the_file(client, shm_dir) -> None:
    key = BlockKey("round-trip", 1, 7)
    meta, data = make_value(6 * MIB + 4, seed=1)
    stored_before = files(shm_dir, "s-")

    assert client.put_bytes(key, meta, memoryview(data), use_shm=True) == len(data)
    got = client.get_bytes(key, use_shm=True)

    assert got is not None
    assert got[0] == meta
    assert got[1] == data
    # The store kept the client's file as the value (renamed, not copied), and read from it.
    assert len(files(shm_dir, "s-")) == len(stored_before) + 1
    assert files(shm_dir, "h-") == []
    out = bytearray(len(data) + 10)
    assert client.get_into(key, out, use_shm=True) == meta
    assert out[: len(data)] == data and out[len(data) :] == bytes(10)
    # Both paths read the same value.
    assert client.get(key) == (meta, data)
    assert client.get_into(key, out, use_shm=False) == meta and out[: len(data)] == data
    assert client.stats().used_bytes >= len(data)
    assert client.delete(key) is True
    assert files(shm_dir, "s-") == stored_before
    assert client.get_bytes(key, use_shm=True) is None
    assert client.get_into(key, out, use_shm=True) is None
    client.put_bytes(key, meta, data, use_shm=True)
    with pytest.raises(ValueError, match="out holds"):
        client.get_into(key, bytearray(8), use_shm=True)
    assert client.delete(key) is True


def pieces(data: bytes, *cuts: int) -> list[memoryview]:
    """`data` cut at the given offsets, as views: a value made of several buffers."""
    bounds = [0, *cuts, len(data)]
    return [memoryview(data)[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("use_shm", [True, False])
def test_values_of_several_buffers_go_out_and_come_back_in_place(client, use_shm) -> None:
    """Scatter-gather: a value written from several buffers (a pool's block runs) and read
    back into several, on both paths, byte-identical and in order."""
    key = BlockKey("scatter", 0, 1)
    meta, data = make_value(9 * MIB + 12, seed=9)  # large enough to be copied in two halves
    assert client.put_bytes(key, meta, pieces(data, 1000, 5 * MIB + 3), use_shm=use_shm) == len(
        data
    )
    outs = [bytearray(5), bytearray(6 * MIB + 1), bytearray(len(data) - 6 * MIB - 6 + 7)]
    assert client.get_into(key, outs, use_shm=use_shm) == meta
    assert b"".join(outs)[: len(data)] == data and outs[-1][-7:] == bytes(7)
    with pytest.raises(ValueError, match="out holds"):
        client.get_into(key, [bytearray(10), bytearray(10)], use_shm=use_shm)
    with pytest.raises(ValueError, match="total_bytes"):
        client.put_bytes(key, meta, pieces(data, 10)[:1], use_shm=use_shm)
    assert client.delete(key) is True


def test_stage_copies_at_once_and_commit_stores_later(client, shm_dir) -> None:
    """Swap-out's contract: after stage() the caller may overwrite its buffers (the next step
    reuses the blocks); commit() from another thread stores what was there at stage()."""
    key = BlockKey("staged", 0, 2)
    meta, data = make_value(2 * MIB, seed=10)
    source = bytearray(data)
    staged = client.stage(meta, [memoryview(source)[:777], memoryview(source)[777:]])
    assert staged.path and os.path.dirname(staged.path) == os.path.realpath(shm_dir)
    source[:] = bytes(len(source))  # reused at once
    done = []
    thread = threading.Thread(target=lambda: done.append(client.commit(staged, key)))
    thread.start()
    thread.join()
    assert done == [len(data)]
    assert client.get_bytes(key, use_shm=True) == (meta, data)
    assert client.delete(key) is True


def test_float16_and_empty_values(client: KVStoreClient) -> None:
    key = BlockKey("small", 0, 0)
    meta, data = make_value(64, dtype="float16", seed=2)
    client.put_bytes(key, meta, bytearray(data), use_shm=True)
    assert client.get_bytes(key, use_shm=True) == (meta, data)
    empty = TensorMeta(dtype="float16", shape=(0,), total_bytes=0)
    client.put_bytes(BlockKey("small", 0, 1), empty, b"", use_shm=True)
    got = client.get_bytes(BlockKey("small", 0, 1), use_shm=True)
    assert got is not None and got[0] == empty and bytes(got[1]) == b""
    assert client.delete_job("small") == 2


def test_grpc_put_is_read_through_a_handed_out_copy(client, shm_dir) -> None:
    key = BlockKey("mixed", 0, 0)
    meta, data = make_value(3 * MIB, seed=3)
    client.put_bytes(key, meta, data, use_shm=False)

    got = client.get_bytes(key, use_shm=True)

    assert got is not None and got[0] == meta and got[1] == data
    assert files(shm_dir, "h-") == []  # the client took the copy over (as a spare)
    assert client.delete_job("mixed") == 1


def test_replace_and_delete_job_remove_the_segments(client, shm_dir) -> None:
    stored_before = files(shm_dir, "s-")
    for block_id in range(3):
        client.put_bytes(BlockKey("doomed", 0, block_id), *make_value(1024, seed=block_id))
    client.put_bytes(BlockKey("doomed", 0, 0), *make_value(2048, seed=9))  # replaces
    assert len(files(shm_dir, "s-")) == len(stored_before) + 3
    assert client.get_bytes(BlockKey("doomed", 0, 0)) == make_value(2048, seed=9)

    assert client.delete_job("doomed") == 3
    assert files(shm_dir, "s-") == stored_before


def test_shm_puts_count_against_capacity(kvstore, shm_dir) -> None:
    with KVStoreClient(kvstore.address) as client:
        before = client.stats()
        free_bytes = before.capacity_bytes - before.used_bytes
        num_bytes = free_bytes - free_bytes % 4
        client.put_bytes(BlockKey("big", 0, 0), *make_value(num_bytes), use_shm=True)

        with pytest.raises(StoreFullError):
            client.put_bytes(BlockKey("big", 0, 1), *make_value(4096), use_shm=True)

        after = client.stats()
        assert after.used_bytes == before.used_bytes + num_bytes
        assert after.num_rejected_puts == before.num_rejected_puts + 1
        assert client.delete_job("big") == 1
    assert files(shm_dir, "c-") == []  # the refused file was removed, spares on close


def test_released_files_are_recycled(kvstore, shm_dir) -> None:
    """A deleted value's file becomes a spare, handed back in the next PutShm reply."""
    with KVStoreClient(kvstore.address) as client:
        for round_index in range(3):
            keys = [BlockKey(f"recycle-{round_index}", 0, block) for block in range(4)]
            for block, key in enumerate(keys):
                client.put_bytes(key, *make_value(MIB, seed=block), use_shm=True)
            assert all(
                client.get_bytes(key) == make_value(MIB, seed=b) for b, key in enumerate(keys)
            )
            assert client.delete_job(f"recycle-{round_index}") == 4
            assert len(files(shm_dir, "f-")) >= 1  # spares, not removed
        # Five files of 1 MiB went round and round (four values and the client's spare), now
        # the store's spares and the client's: not one per put.
        spares = files(shm_dir, "f-") + files(shm_dir, "c-")
        assert sum((shm_dir / name).stat().st_size == MIB for name in spares) == 5
    assert files(shm_dir, "c-") == []


def test_readers_never_see_half_a_write_through_recycled_files(kvstore) -> None:
    """Values replaced and deleted while others read them: files are recycled under readers,
    who must then see a whole value (old or new) or a miss, never a mix."""
    key = BlockKey("churn", 0, 0)
    values = [make_value(256 * 1024, seed=seed) for seed in range(3)]
    stop = threading.Event()
    seen: list[bool] = []

    def read() -> None:
        with KVStoreClient(kvstore.address) as reader:
            out = bytearray(256 * 1024)
            while not stop.is_set():
                meta = reader.get_into(key, out, use_shm=True)
                seen.append(meta is None or (meta, bytes(out)) in values)

    with KVStoreClient(kvstore.address) as writer:
        readers = [threading.Thread(target=read) for _ in range(2)]
        for reader in readers:
            reader.start()
        for round_index in range(150):
            writer.put_bytes(key, *values[round_index % 3], use_shm=True)
            if round_index % 7 == 0:
                writer.delete(key)
        stop.set()
        for reader in readers:
            reader.join()
        writer.delete(key)
    assert len(seen) > 10 and all(seen)


def test_concurrent_clients_threads(client: KVStoreClient) -> None:
    errors: list[BaseException] = []

    def worker(thread_index: int) -> None:
        try:
            for block_id in range(10):
                key = BlockKey(f"thread-{thread_index}", 0, block_id)
                meta, data = make_value(64 * 1024, seed=thread_index * 100 + block_id)
                client.put_bytes(key, meta, data)
                assert client.get_bytes(key) == (meta, data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(client.delete_job(f"thread-{index}") for index in range(6)) == 60


def test_pool_off_removes_released_files(shm_dir: Path) -> None:
    kvstore = start_store(shm_dir, "--shm-pool-bytes", "0")
    try:
        with KVStoreClient(kvstore.address) as client:
            prefix = client.info().shm_client_prefix.removesuffix("c-")
            client.put_bytes(BlockKey("no-pool", 0, 0), *make_value(MIB), use_shm=True)
            assert client.delete_job("no-pool") == 1
            assert sorted(n for n in os.listdir(shm_dir) if n.startswith(prefix)) == [
                f"{prefix}lock",
                f"{prefix}probe",
            ]
    finally:
        assert stop_kvstore(kvstore) == 0


def _client_file(shm_dir: Path, client: KVStoreClient, num_bytes: int) -> str:
    name = f"{client.info().shm_client_prefix}test{random.randrange(1 << 30)}"
    write_file(str(shm_dir / name), bytes(num_bytes))
    return name


def _bad_handles(shm_dir: Path, client: KVStoreClient) -> dict[str, tuple[str, str, int]]:
    """case -> (shm_name, field the error names, meta.total_bytes)."""
    prefix = client.info().shm_client_prefix
    directory = shm_dir / f"{prefix}a-directory"
    directory.mkdir(exist_ok=True)
    symlink = shm_dir / f"{prefix}a-symlink"
    if not symlink.exists():
        symlink.symlink_to("/etc/hostname")
    return {
        "empty name": ("", "shm_name", 8),
        "path outside the directory": ("../../etc/passwd", "shm_name", 8),
        "absolute path": ("/etc/passwd", "shm_name", 8),
        "another store's prefix": ("fskv-000000000000-c-x", "shm_name", 8),
        "missing segment": (f"{prefix}missing", "shm_name", 8),
        "a directory": (directory.name, "shm_name", 8),
        "a symlink": (symlink.name, "shm_name", 8),
        "size does not match": (_client_file(shm_dir, client, 16), "meta.total_bytes", 8),
    }


def test_bad_handles_are_invalid_argument_naming_the_field(client, stub, shm_dir) -> None:
    before = client.stats()
    cases = _bad_handles(shm_dir, client)
    for case, (name, field, total_bytes) in cases.items():
        request = kvstore_pb2.PutShmRequest(
            key=kvstore_pb2.BlockKey(job_id="bad", stage_index=0, block_id=0),
            meta=kvstore_pb2.TensorMeta(
                dtype="uint8", shape=[total_bytes], total_bytes=total_bytes
            ),
            shm_name=name,
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.PutShm(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert info.value.details().startswith(f"{field}: "), (case, info.value.details())
    after = client.stats()
    assert (after.num_entries, after.used_bytes) == (before.num_entries, before.used_bytes)
    assert Path("/etc/passwd").exists()
    good_put(client)
    # Refused handles stay the client's: they are all still there, for it to remove.
    for case in ["a directory", "a symlink", "size does not match"]:
        path = shm_dir / cases[case][0]
        assert path.is_symlink() or path.exists()
        path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()


def test_bad_key_and_meta_are_invalid_argument(client, stub, shm_dir) -> None:
    name = _client_file(shm_dir, client, 6)
    cases = {
        "key.job_id": kvstore_pb2.PutShmRequest(
            key=kvstore_pb2.BlockKey(job_id=""),
            meta=kvstore_pb2.TensorMeta(dtype="uint8", shape=[6], total_bytes=6),
            shm_name=name,
        ),
        "meta.shape": kvstore_pb2.PutShmRequest(
            key=kvstore_pb2.BlockKey(job_id="bad"),
            meta=kvstore_pb2.TensorMeta(dtype="float32", shape=[3], total_bytes=6),
            shm_name=name,
        ),
        "meta": kvstore_pb2.PutShmRequest(key=kvstore_pb2.BlockKey(job_id="bad"), shm_name=name),
    }
    for field, request in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            stub.PutShm(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"{field}: "), info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.GetShm(kvstore_pb2.BlockKey(job_id=""), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    os.unlink(shm_dir / name)
    good_put(client)


def test_sigterm_removes_every_file_of_the_store(shm_dir: Path) -> None:
    kvstore = start_store(shm_dir)
    with KVStoreClient(kvstore.address) as client:
        prefix = client.info().shm_client_prefix.removesuffix("c-")
        for block_id in range(4):
            client.put_bytes(BlockKey("left", 0, block_id), *make_value(MIB, seed=block_id))
        client.put_bytes(BlockKey("left", 0, 9), *make_value(MIB), use_shm=False)
        _client_file(shm_dir, client, 100)  # as a client that died before PutShm would leave
        mine = [name for name in os.listdir(shm_dir) if name.startswith(prefix)]
        assert len(mine) == 4 + 1 + 1 + 1  # values, the leaked file, the probe, the lock

    assert stop_kvstore(kvstore) == 0
    assert [name for name in os.listdir(shm_dir) if name.startswith(prefix)] == []


def test_a_killed_stores_files_are_removed_by_the_next_store(kvstore, shm_dir: Path) -> None:
    """SIGKILL leaves the files behind; the next store on the directory sweeps them, and only
    them: a live store's files (the module's `kvstore`, whose lock is held) stay."""
    with KVStoreClient(kvstore.address) as live:
        live_prefix = live.info().shm_client_prefix.removesuffix("c-")
        live.put_bytes(BlockKey("live", 0, 0), *make_value(MIB), use_shm=True)
    victim = start_store(shm_dir)
    with KVStoreClient(victim.address) as client:
        dead_prefix = client.info().shm_client_prefix.removesuffix("c-")
        for block_id in range(3):
            client.put_bytes(BlockKey("dead", 0, block_id), *make_value(MIB, seed=block_id))
    victim.process.kill()
    victim.process.wait(timeout=10)
    assert len([n for n in os.listdir(shm_dir) if n.startswith(dead_prefix)]) == 3 + 2
    live_before = sorted(n for n in os.listdir(shm_dir) if n.startswith(live_prefix))
    successor = start_store(shm_dir)
    try:
        assert [n for n in os.listdir(shm_dir) if n.startswith(dead_prefix)] == []
        assert sorted(n for n in os.listdir(shm_dir) if n.startswith(live_prefix)) == live_before
    finally:
        assert stop_kvstore(successor) == 0


def test_store_without_shm_falls_back_to_grpc(shm_dir: Path) -> None:
    kvstore = start_kvstore("--shm-dir", "", "--log-level", "warning")
    try:
        with KVStoreClient(kvstore.address) as client:
            assert client.info().shm_dir == ""
            assert not client.shm_usable()
            key = BlockKey("no-shm", 0, 0)
            meta, data = make_value(5 * MIB, seed=4)
            assert client.put_bytes(key, meta, data) == len(data)
            assert client.get_bytes(key) == (meta, data)
            # Staging without shm keeps a private copy, committed over gRPC.
            source = bytearray(data)
            staged = client.stage(meta, [source])
            assert staged.path == "" and staged.data == data
            source[:] = bytes(len(source))
            assert client.commit(staged, key) == len(data)
            assert client.get_bytes(key) == (meta, data)
            with pytest.raises(ShmUnavailableError):
                client.put_bytes(key, meta, data, use_shm=True)
            with grpc.insecure_channel(kvstore.address) as channel:
                stub = kvstore_pb2_grpc.KVStoreStub(channel)
                with pytest.raises(grpc.RpcError) as info:
                    stub.GetShm(kvstore_pb2.BlockKey(job_id="no-shm"), timeout=10)
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        assert stop_kvstore(kvstore) == 0


def test_client_follows_a_restarted_store(shm_dir: Path) -> None:
    """A new store has a new prefix: the client's cached one is refused, and it re-probes."""
    kvstore = start_store(shm_dir)
    client = KVStoreClient(kvstore.address)
    client.put_bytes(BlockKey("restart", 0, 0), *make_value(4096), use_shm=True)
    stop_kvstore(kvstore)
    port = kvstore.address.rsplit(":", 1)[1]
    kvstore = start_store(shm_dir, "--port", port)  # argparse: the last --port wins
    try:
        key = BlockKey("restart", 0, 1)
        assert client.put_bytes(key, *make_value(4096)) == 4096  # fell back to gRPC
        assert client.put_bytes(key, *make_value(4096, seed=1), use_shm=True) == 4096
        assert client.get_bytes(key, use_shm=True) == make_value(4096, seed=1)
    finally:
        client.close()
        assert stop_kvstore(kvstore) == 0
    assert files(shm_dir, "c-") == []


def test_redis_backend_copies_segments_in(shm_dir, redis_url, redis_prefix) -> None:
    kvstore = start_store(shm_dir, "--backend", redis_url, "--redis-prefix", redis_prefix)
    try:
        with KVStoreClient(kvstore.address) as client:
            assert client.shm_usable()
            key = BlockKey("redis-shm", 0, 0)
            meta, data = make_value(5 * MIB, seed=8)
            assert client.put_bytes(key, meta, data, use_shm=True) == len(data)
            prefix = client.info().shm_client_prefix.removesuffix("c-")
            # Copied into Redis: the store keeps no value file, and gave the file back to the
            # client as a spare.
            assert [n for n in os.listdir(shm_dir) if n.startswith(prefix + "s-")] == []
            assert client.get_bytes(key, use_shm=True) == (meta, data)
            assert client.get(key) == (meta, data)
            assert client.stats().backend == "redis"
            assert client.delete_job("redis-shm") == 1
            assert client.get_bytes(key, use_shm=True) is None
        assert sorted(n for n in os.listdir(shm_dir) if n.startswith(prefix)) == [
            f"{prefix}lock",
            f"{prefix}probe",
        ]  # the client removed its spares on close
    finally:
        assert stop_kvstore(kvstore) == 0
