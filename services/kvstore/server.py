"""The kvstore's gRPC edge: protobuf <-> dataclasses, chunking, and validation of Put streams.

The storage itself is a `KVBackend` (services.kvstore.backend); this module is the only one of
the service that imports the generated protobuf code besides the client. The same-host fast
path (PutShm, GetShm) moves only file names; a `ShmArea` (services.kvstore.shm) owns the files.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator

import grpc

from fastserve.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from services.common.grpc_server import bind, build_server, set_health
from services.kvstore.backend import (
    BlockKey,
    FieldError,
    KVBackend,
    MemoryBackend,
    SegmentBackend,
    StoreFullError,
    StoreStats,
    TensorMeta,
)
from services.kvstore.shm import ShmArea, StoreInfo, host_id

log = logging.getLogger(__name__)

SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name
MAX_CHUNK_BYTES = 4 * 1024 * 1024


def key_from_pb(pb: kvstore_pb2.BlockKey, prefix: str = "") -> BlockKey:
    """Raises InvalidArgumentError naming the field as `prefix + field`."""
    try:
        return BlockKey(job_id=pb.job_id, stage_index=pb.stage_index, block_id=pb.block_id)
    except FieldError as exc:
        raise InvalidArgumentError(prefix + exc.field, exc.problem) from exc


def key_to_pb(key: BlockKey) -> kvstore_pb2.BlockKey:
    return kvstore_pb2.BlockKey(
        job_id=key.job_id, stage_index=key.stage_index, block_id=key.block_id
    )


def meta_from_pb(pb: kvstore_pb2.TensorMeta, prefix: str = "meta.") -> TensorMeta:
    """Raises InvalidArgumentError naming the field as `prefix + field`."""
    try:
        return TensorMeta(dtype=pb.dtype, shape=tuple(pb.shape), total_bytes=pb.total_bytes)
    except FieldError as exc:
        raise InvalidArgumentError(prefix + exc.field, exc.problem) from exc


def meta_to_pb(meta: TensorMeta) -> kvstore_pb2.TensorMeta:
    return kvstore_pb2.TensorMeta(
        dtype=meta.dtype, shape=list(meta.shape), total_bytes=meta.total_bytes
    )


def stats_to_pb(stats: StoreStats) -> kvstore_pb2.StatsResponse:
    return kvstore_pb2.StatsResponse(
        backend=stats.backend,
        num_entries=stats.num_entries,
        used_bytes=stats.used_bytes,
        capacity_bytes=stats.capacity_bytes,
        num_puts=stats.num_puts,
        num_gets=stats.num_gets,
        num_misses=stats.num_misses,
        num_rejected_puts=stats.num_rejected_puts,
        bytes_in=stats.bytes_in,
        bytes_out=stats.bytes_out,
    )


def stats_from_pb(pb: kvstore_pb2.StatsResponse) -> StoreStats:
    return StoreStats(
        backend=pb.backend,
        num_entries=pb.num_entries,
        used_bytes=pb.used_bytes,
        capacity_bytes=pb.capacity_bytes,
        num_puts=pb.num_puts,
        num_gets=pb.num_gets,
        num_misses=pb.num_misses,
        num_rejected_puts=pb.num_rejected_puts,
        bytes_in=pb.bytes_in,
        bytes_out=pb.bytes_out,
    )


def info_to_pb(info: StoreInfo) -> kvstore_pb2.InfoResponse:
    return kvstore_pb2.InfoResponse(
        backend=info.backend,
        capacity_bytes=info.capacity_bytes,
        host_id=info.host_id,
        shm_dir=info.shm_dir,
        shm_client_prefix=info.shm_client_prefix,
        shm_probe_name=info.shm_probe_name,
        shm_probe_token=info.shm_probe_token,
        max_chunk_bytes=info.max_chunk_bytes,
    )


def info_from_pb(pb: kvstore_pb2.InfoResponse) -> StoreInfo:
    return StoreInfo(
        backend=pb.backend,
        capacity_bytes=pb.capacity_bytes,
        host_id=pb.host_id,
        shm_dir=pb.shm_dir,
        shm_client_prefix=pb.shm_client_prefix,
        shm_probe_name=pb.shm_probe_name,
        shm_probe_token=pb.shm_probe_token,
        max_chunk_bytes=pb.max_chunk_bytes,
    )


def split_chunks(data: bytes, chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[bytes]:
    """At least one chunk, so an empty value still carries its meta."""
    yield data[:chunk_bytes]
    for start in range(chunk_bytes, len(data), chunk_bytes):
        yield data[start : start + chunk_bytes]


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, backend: KVBackend, shm: ShmArea | None = None) -> None:
        self._backend = backend
        self._shm = shm

    def Put(
        self, request_iterator: Iterable[kvstore_pb2.PutChunk], context: grpc.ServicerContext
    ) -> kvstore_pb2.PutResponse:
        chunks = iter(request_iterator)
        first = next(chunks, None)
        if first is None or not first.HasField("key"):
            raise InvalidArgumentError("key", "the first chunk must carry the key")
        if not first.HasField("meta"):
            raise InvalidArgumentError("meta", "the first chunk must carry the meta")
        key = key_from_pb(first.key, prefix="key.")
        meta = meta_from_pb(first.meta)
        try:
            # Refuse before receiving the bytes when they cannot fit.
            self._backend.check_put(key, meta.total_bytes)
        except StoreFullError as exc:
            raise ResourceExhaustedError(str(exc)) from exc

        data = _receive_data(itertools.chain([first], chunks), meta.total_bytes)
        try:
            self._backend.put(key, meta, data)
        except StoreFullError as exc:
            raise ResourceExhaustedError(str(exc)) from exc
        return kvstore_pb2.PutResponse(stored_bytes=len(data))

    def Get(
        self, request: kvstore_pb2.BlockKey, context: grpc.ServicerContext
    ) -> Iterator[kvstore_pb2.GetChunk]:
        key = key_from_pb(request)
        value = self._backend.get(key)
        if value is None:
            raise NotFoundError(f"no block group for {key}")
        meta, data = value
        for index, part in enumerate(split_chunks(data)):
            if index == 0:
                yield kvstore_pb2.GetChunk(meta=meta_to_pb(meta), data=part)
            else:
                yield kvstore_pb2.GetChunk(data=part)

    def Delete(
        self, request: kvstore_pb2.DeleteRequest, context: grpc.ServicerContext
    ) -> kvstore_pb2.DeleteResponse:
        if request.all_blocks:
            if not request.job_id:
                raise InvalidArgumentError("job_id", "must not be empty")
            num_deleted = self._backend.delete_job(request.job_id)
        else:
            key = key_from_pb(
                kvstore_pb2.BlockKey(
                    job_id=request.job_id,
                    stage_index=request.stage_index,
                    block_id=request.block_id,
                )
            )
            num_deleted = int(self._backend.delete(key))
        return kvstore_pb2.DeleteResponse(num_deleted=num_deleted)

    def Stats(
        self, request: kvstore_pb2.StatsRequest, context: grpc.ServicerContext
    ) -> kvstore_pb2.StatsResponse:
        return stats_to_pb(self._backend.stats())

    def Info(
        self, request: kvstore_pb2.InfoRequest, context: grpc.ServicerContext
    ) -> kvstore_pb2.InfoResponse:
        stats = self._backend.stats()
        shm = self._shm
        return info_to_pb(
            StoreInfo(
                backend=stats.backend,
                capacity_bytes=stats.capacity_bytes,
                host_id=host_id(),
                shm_dir=shm.directory if shm else "",
                shm_client_prefix=shm.client_prefix if shm else "",
                shm_probe_name=shm.probe_name if shm else "",
                shm_probe_token=shm.probe_token if shm else "",
                max_chunk_bytes=MAX_CHUNK_BYTES,
            )
        )

    def PutShm(
        self, request: kvstore_pb2.PutShmRequest, context: grpc.ServicerContext
    ) -> kvstore_pb2.PutResponse:
        shm = self._require_shm()
        if not request.HasField("key"):
            raise InvalidArgumentError("key", "is required")
        if not request.HasField("meta"):
            raise InvalidArgumentError("meta", "is required")
        key = key_from_pb(request.key, prefix="key.")
        meta = meta_from_pb(request.meta)
        try:
            shm.check_client_segment(request.shm_name, meta.total_bytes)
            self._backend.check_put(key, meta.total_bytes)
            segment = shm.adopt(request.shm_name, meta.total_bytes)
        except FieldError as exc:
            raise InvalidArgumentError(exc.field, exc.problem) from exc
        except StoreFullError as exc:
            raise ResourceExhaustedError(str(exc)) from exc
        try:
            if isinstance(self._backend, SegmentBackend):
                self._backend.put_segment(key, meta, segment)  # zero copy: the file is the value
            else:
                with segment.view() as data:
                    self._backend.put(key, meta, data)  # type: ignore[arg-type]
                segment.release()  # copied in: its file becomes a spare
        except StoreFullError as exc:
            segment.release()  # renamed: the client can no longer reach it
            raise ResourceExhaustedError(str(exc)) from exc
        except BaseException:
            segment.release()
            raise
        return kvstore_pb2.PutResponse(
            stored_bytes=meta.total_bytes, free_shm_name=shm.give_spare(meta.total_bytes)
        )

    def GetShm(
        self, request: kvstore_pb2.BlockKey, context: grpc.ServicerContext
    ) -> kvstore_pb2.GetShmResponse:
        shm = self._require_shm()
        key = key_from_pb(request)
        if isinstance(self._backend, SegmentBackend):
            value = self._backend.get_segment(key)
        else:
            value = self._backend.get(key)
        if value is None:
            raise NotFoundError(f"no block group for {key}")
        meta, payload = value
        if isinstance(payload, bytes):
            try:
                name = shm.hand_out(payload)
            except OSError as exc:  # the tmpfs is full: the client falls back to Get
                raise ResourceExhaustedError(f"cannot make a shm copy: {exc}") from exc
            return kvstore_pb2.GetShmResponse(
                meta=meta_to_pb(meta), shm_name=name, client_owns=True
            )
        return kvstore_pb2.GetShmResponse(
            meta=meta_to_pb(meta), shm_name=payload.name, client_owns=False
        )

    def _require_shm(self) -> ShmArea:
        if self._shm is None:
            raise FailedPreconditionError("the shared-memory fast path is off on this kvstore")
        return self._shm


def _receive_data(chunks: Iterable[kvstore_pb2.PutChunk], total_bytes: int) -> bytes:
    """Joins the payload of a Put stream, checking each chunk and the announced total."""
    parts: list[bytes] = []
    num_received = 0
    for index, chunk in enumerate(chunks):
        if index > 0 and (chunk.HasField("key") or chunk.HasField("meta")):
            raise InvalidArgumentError(
                "key", f"chunk {index}: only the first chunk carries key/meta"
            )
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise InvalidArgumentError(
                "data", f"chunk {index} has {len(chunk.data)} bytes, over {MAX_CHUNK_BYTES}"
            )
        num_received += len(chunk.data)
        if num_received > total_bytes:
            # Stop early: the stream is wrong, and buffering the rest would only cost memory.
            raise InvalidArgumentError(
                "meta.total_bytes", f"received more than the {total_bytes} bytes announced"
            )
        parts.append(chunk.data)
    if num_received != total_bytes:
        raise InvalidArgumentError(
            "meta.total_bytes", f"received {num_received} bytes, {total_bytes} announced"
        )
    return b"".join(parts)


def serve(
    address: str,
    capacity_bytes: int,
    backend: KVBackend | None = None,
    shm: ShmArea | None = None,
    *,
    reuse_port: bool = False,
) -> tuple[grpc.Server, int]:
    """Builds, binds and starts the server and marks it healthy; returns it and its port. The
    caller closes `backend` and `shm` after stopping the server."""
    server, health_servicer = build_server([SERVICE_NAME], reuse_port=reuse_port)
    store = backend if backend is not None else MemoryBackend(capacity_bytes)
    kvstore_pb2_grpc.add_KVStoreServicer_to_server(KVStoreServicer(store, shm), server)
    port = bind(server, address)
    server.start()
    set_health(health_servicer, [SERVICE_NAME], serving=True)
    log.info("serving %s on port %d, capacity %d bytes", SERVICE_NAME, port, capacity_bytes)
    return server, port
