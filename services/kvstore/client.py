"""A small synchronous client of the kvstore, speaking in the backend's dataclasses.

Workers use it to swap KV blocks out and in, through `put_bytes` and `get_into` / `get_bytes`:
on the store's host these pass the bytes through a shared-memory file and only its name over
gRPC (one copy each way, no serialisation; see services.kvstore.shm); elsewhere, or when the
store has no shm, they stream chunks over gRPC. `put*` raise `StoreFullError` when the store
refuses for capacity (the scheduler then recomputes the job); `get*` return None when the value
is missing. Other failures surface as `grpc.RpcError`.

Thread-safe: one channel, and the fast path's probe result and spare files are guarded by a
lock, so a worker can call it from background copy threads.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from fastserve.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.common.grpc_server import MAX_MESSAGE_BYTES, RECONNECT_OPTIONS
from services.kvstore.backend import BlockKey, StoreFullError, StoreStats, TensorMeta
from services.kvstore.server import (
    info_from_pb,
    key_to_pb,
    meta_from_pb,
    meta_to_pb,
    split_chunks,
    stats_from_pb,
)
from services.kvstore.shm import StoreInfo, overwrite_or_write, read_into, remove
from services.kvstore.vectored_io import Buffer, Buffers, byte_views, num_bytes_of

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *RECONNECT_OPTIONS,
]


# Status codes after which a shm call is retried over gRPC streaming (when not forced) and the
# fast path is probed again on the next call: the store restarted (new prefix), turned shm off,
# or its tmpfs is full.
_SHM_FALLBACK_CODES = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
)


# Spare shm files a client keeps to fill for its next puts (see services.kvstore.shm, Recycling).
MAX_SPARE_FILES = 8


class ShmUnavailableError(RuntimeError):
    """use_shm=True, but this process cannot use the store's shared-memory fast path."""


class _FallBack(Exception):
    """The shm path failed in a way gRPC streaming can still serve."""


class KVStoreClient:
    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = kvstore_pb2_grpc.KVStoreStub(self._channel)
        self._lock = threading.Lock()  # guards the three below
        self._shm_info: StoreInfo | None = None  # the store's Info when shm is usable here
        self._shm_probed = False
        self._spares: dict[int, list[str]] = {}  # size -> paths of our spare files

    def put_bytes(
        self, key: BlockKey, meta: TensorMeta, data: Buffers, *, use_shm: bool | None = None
    ) -> int:
        """Stores `data` (meta.total_bytes long: one buffer, or several back to back) under
        `key`; returns the bytes stored. Through shared memory when the store is on this host,
        else gRPC streaming; `use_shm` forces one way (True raises ShmUnavailableError when shm
        cannot be used). StoreFullError when full. `data` may be reused once this returns."""
        if self._shm_target(use_shm) is None:
            _check_size(data, meta)  # stage() checks it on the shm path
            return self.put(key, meta, data)
        return self.commit(self.stage(meta, data, use_shm=use_shm), key)

    def stage(self, meta: TensorMeta, data: Buffers, *, use_shm: bool | None = None) -> Staged:
        """First half of `put_bytes`: copies `data` out now (into a shared-memory file when
        the store is on this host: the value's only copy; else into a private buffer), so the
        caller may reuse `data` at once; `commit` then stores it, from any thread."""
        num_bytes = _check_size(data, meta)
        info = self._shm_target(use_shm)
        if info is not None:
            new_path = os.path.join(info.shm_dir, f"{info.shm_client_prefix}{uuid.uuid4().hex}")
            try:
                path = overwrite_or_write(self._take_spare(num_bytes), new_path, data)
            except OSError as exc:  # the tmpfs is full, or the directory went away
                if use_shm:
                    raise
                log.debug("cannot write %s (%s): using gRPC streaming", new_path, exc)
            else:
                return Staged(meta, info=info, path=path, forced=use_shm is True)
        return Staged(meta, data=b"".join(byte_views(data)))

    def commit(self, staged: Staged, key: BlockKey) -> int:
        """Second half of `put_bytes`: stores what `stage` copied out under `key`."""
        if staged.info is not None:
            try:
                return self._put_shm(staged, key)
            except _FallBack:
                pass
        return self.put(key, staged.meta, staged.take_bytes())

    def get_bytes(
        self, key: BlockKey, *, use_shm: bool | None = None
    ) -> tuple[TensorMeta, memoryview | bytes] | None:
        """The value under `key` (a private copy), or None when missing. `use_shm` as in
        `put_bytes`. A worker with a destination buffer saves a copy with `get_into`."""
        info = self._shm_target(use_shm)
        if info is not None:
            try:
                return self._get_shm(info, key, None, forced=use_shm is True)
            except _FallBack:
                pass
        return self.get(key)

    def get_into(
        self, key: BlockKey, out: Buffers, *, use_shm: bool | None = None
    ) -> TensorMeta | None:
        """Copies the value under `key` into `out` (one writable buffer, or several filled in
        turn; together at least meta.total_bytes) and returns its meta; None when missing, and
        then what `out` holds is unspecified. One copy on the shm path, straight into `out`.
        `use_shm` as in `put_bytes`."""
        targets = byte_views(out)
        if any(target.readonly for target in targets):
            raise ValueError("out must be writable")
        info = self._shm_target(use_shm)
        if info is not None:
            try:
                copied = self._get_shm(info, key, targets, forced=use_shm is True)
            except _FallBack:
                pass
            else:
                return None if copied is None else copied[0]
        value = self.get(key)
        if value is None:
            return None
        _check_fits(targets, value[0])
        source = memoryview(value[1])
        for target in targets:
            if not source:
                break
            part, source = source[: target.nbytes], source[target.nbytes :]
            target[: part.nbytes] = part
        return value[0]

    def info(self) -> StoreInfo:
        return info_from_pb(self._stub.Info(kvstore_pb2.InfoRequest(), timeout=self.timeout_s))

    def shm_usable(self) -> bool:
        """Whether this process can use the store's shared-memory fast path (asked once)."""
        return self._shm_target(None) is not None

    def put(self, key: BlockKey, meta: TensorMeta, data: Buffers) -> int:
        """Stores `data` under `key` by gRPC streaming; returns the bytes stored."""
        if not isinstance(data, bytes | bytearray | memoryview):
            data = b"".join(byte_views(data))
        try:
            reply = self._stub.Put(_put_chunks(key, meta, data), timeout=self.timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise StoreFullError(exc.details()) from exc
            raise
        return reply.stored_bytes

    def get(self, key: BlockKey) -> tuple[TensorMeta, bytes] | None:
        meta: TensorMeta | None = None
        parts: list[bytes] = []
        try:
            for chunk in self._stub.Get(key_to_pb(key), timeout=self.timeout_s):
                if chunk.HasField("meta"):
                    meta = meta_from_pb(chunk.meta)
                parts.append(chunk.data)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        if meta is None:
            raise RuntimeError(f"kvstore at {self.address} sent no meta for {key}")
        return meta, b"".join(parts)

    def delete(self, key: BlockKey) -> bool:
        """Deletes one value; whether it existed."""
        request = kvstore_pb2.DeleteRequest(
            job_id=key.job_id, stage_index=key.stage_index, block_id=key.block_id
        )
        return self._stub.Delete(request, timeout=self.timeout_s).num_deleted > 0

    def delete_job(self, job_id: str) -> int:
        """Deletes every value of a job; how many there were."""
        request = kvstore_pb2.DeleteRequest(job_id=job_id, all_blocks=True)
        return self._stub.Delete(request, timeout=self.timeout_s).num_deleted

    def stats(self) -> StoreStats:
        return stats_from_pb(self._stub.Stats(kvstore_pb2.StatsRequest(), timeout=self.timeout_s))

    def _shm_target(self, use_shm: bool | None) -> StoreInfo | None:
        """The store's Info when the call should go through shm, None for gRPC streaming."""
        if use_shm is False:
            return None
        with self._lock:
            if not self._shm_probed:
                try:
                    store = self.info()
                except grpc.RpcError as exc:
                    if use_shm:
                        raise
                    log.debug("kvstore Info failed (%s): using gRPC streaming", exc.code())
                    return None  # not cached: probe again once the store answers
                self._shm_info = store if store.shm_usable_here() else None
                self._shm_probed = True
            info = self._shm_info
        if info is None and use_shm:
            raise ShmUnavailableError(f"kvstore at {self.address} has no shm path usable here")
        return info

    def _forget_shm(self) -> None:
        """After a shm failure: probe the store again on the next call, and drop our spares
        (a restarted store has a new prefix, and removed the old store's files)."""
        with self._lock:
            self._shm_probed = False
            self._shm_info = None
            spares = [path for paths in self._spares.values() for path in paths]
            self._spares.clear()
        for path in spares:
            remove(path)

    def _take_spare(self, num_bytes: int) -> str:
        with self._lock:
            paths = self._spares.get(num_bytes)
            return paths.pop() if paths else ""

    def _keep_spare(self, path: str, num_bytes: int) -> None:
        with self._lock:
            keep = num_bytes > 0 and sum(map(len, self._spares.values())) < MAX_SPARE_FILES
            if keep:
                self._spares.setdefault(num_bytes, []).append(path)
        if not keep:
            remove(path)

    def _put_shm(self, staged: Staged, key: BlockKey) -> int:
        """Hands the staged file to the store; raises _FallBack (the bytes kept in `staged`)
        to go through gRPC streaming instead."""
        assert staged.info is not None
        request = kvstore_pb2.PutShmRequest(
            key=key_to_pb(key), meta=meta_to_pb(staged.meta), shm_name=os.path.basename(staged.path)
        )
        try:
            reply = self._stub.PutShm(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            # NOTE: on error the file is still ours; on success it is the store's.
            fall_back = not staged.forced and exc.code() in _SHM_FALLBACK_CODES
            if fall_back and exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                staged.keep_bytes()  # read back before the file goes
            remove(staged.path)
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise StoreFullError(exc.details()) from exc
            if not fall_back:
                raise
            log.info("kvstore PutShm failed (%s: %s): using gRPC", exc.code(), exc.details())
            self._forget_shm()
            raise _FallBack from exc
        if reply.free_shm_name:
            spare = os.path.join(staged.info.shm_dir, reply.free_shm_name)
            self._keep_spare(spare, staged.meta.total_bytes)
        return reply.stored_bytes

    def _get_shm(
        self, info: StoreInfo, key: BlockKey, out: list[memoryview] | None, *, forced: bool
    ) -> tuple[TensorMeta, memoryview | None] | None:
        """Copies the value into `out` (a new buffer when None); None on a miss. Raises
        _FallBack to go through gRPC streaming instead."""
        for _ in range(2):  # a value replaced while we copied it: ask once more
            try:
                reply = self._stub.GetShm(key_to_pb(key), timeout=self.timeout_s)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                if forced or exc.code() not in _SHM_FALLBACK_CODES:
                    raise
                log.info("kvstore GetShm failed (%s: %s): using gRPC", exc.code(), exc.details())
                self._forget_shm()
                raise _FallBack from exc
            meta = meta_from_pb(reply.meta)
            path = os.path.join(info.shm_dir, reply.shm_name)
            if out is None:
                target: memoryview | None = memoryview(bytearray(meta.total_bytes))
                targets = [target]
            else:
                _check_fits(out, meta)
                target, targets = None, out
            copied = read_into(path, targets, meta.total_bytes)
            if reply.client_owns:  # ours now: keep it to fill for a later put
                spare = os.path.join(info.shm_dir, f"{info.shm_client_prefix}{uuid.uuid4().hex}")
                try:
                    os.rename(path, spare)
                except FileNotFoundError:
                    pass
                else:
                    self._keep_spare(spare, meta.total_bytes)
            if copied:
                return meta, None if target is None else target[: meta.total_bytes]
        return None  # released twice while we copied: deleted, as far as we can tell

    def close(self) -> None:
        self._forget_shm()
        self._channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_size(data: Buffers, meta: TensorMeta) -> int:
    num_bytes = num_bytes_of(data)
    if num_bytes != meta.total_bytes:
        raise ValueError(f"got {num_bytes} bytes, meta.total_bytes is {meta.total_bytes}")
    return num_bytes


def _check_fits(out: list[memoryview], meta: TensorMeta) -> None:
    num_bytes = sum(view.nbytes for view in out)
    if num_bytes < meta.total_bytes:
        raise ValueError(f"out holds {num_bytes} bytes, the value is {meta.total_bytes}")


@dataclass(slots=True)
class Staged:
    """A value copied out by `KVStoreClient.stage`, waiting for `commit`: in a shared-memory
    file of ours (`path`), or in `data`."""

    meta: TensorMeta
    info: StoreInfo | None = None  # the store's, when staged in shm
    path: str = ""
    forced: bool = False  # use_shm=True: no fallback to gRPC
    data: bytes = b""

    def keep_bytes(self) -> None:
        """Reads the staged file back, for a fallback to gRPC streaming."""
        with open(self.path, "rb", buffering=0) as file:
            self.data = file.read()
        self.info = None

    def take_bytes(self) -> bytes:
        data, self.data = self.data, b""
        return data


def _put_chunks(key: BlockKey, meta: TensorMeta, data: Buffer) -> Iterator[kvstore_pb2.PutChunk]:
    if not isinstance(data, bytes):
        data = memoryview(data).cast("B")  # slices without copying; each chunk copied once below
    for index, raw in enumerate(split_chunks(data)):  # type: ignore[arg-type]
        part = raw if isinstance(raw, bytes) else bytes(raw)
        if index == 0:
            yield kvstore_pb2.PutChunk(key=key_to_pb(key), meta=meta_to_pb(meta), data=part)
        else:
            yield kvstore_pb2.PutChunk(data=part)
