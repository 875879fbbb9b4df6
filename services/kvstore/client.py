"""A small synchronous client of the kvstore, speaking in the backend's dataclasses.

Workers use it to swap KV blocks out and in. `put` raises `StoreFullError` when the store
refuses for capacity (the scheduler then recomputes the job); `get` returns None when the value
is missing. Other failures surface as `grpc.RpcError`.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from fastserve.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.common.grpc_server import MAX_MESSAGE_BYTES
from services.kvstore.backend import BlockKey, StoreFullError, StoreStats, TensorMeta
from services.kvstore.server import (
    key_to_pb,
    meta_from_pb,
    meta_to_pb,
    split_chunks,
    stats_from_pb,
)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class KVStoreClient:
    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = kvstore_pb2_grpc.KVStoreStub(self._channel)

    def put(self, key: BlockKey, meta: TensorMeta, data: bytes) -> int:
        """Stores `data` under `key`; returns the bytes stored."""
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

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _put_chunks(key: BlockKey, meta: TensorMeta, data: bytes) -> Iterator[kvstore_pb2.PutChunk]:
    for index, part in enumerate(split_chunks(data)):
        if index == 0:
            yield kvstore_pb2.PutChunk(key=key_to_pb(key), meta=meta_to_pb(meta), data=part)
        else:
            yield kvstore_pb2.PutChunk(data=part)
