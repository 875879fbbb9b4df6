"""Storage behind the kvstore service: block groups keyed by (job, stage, block), bounded in bytes.

No gRPC here. `KVBackend` is what the server needs from a store; `MemoryBackend` keeps values in
this process. A value is stored as one complete, immutable `bytes` object (or, from the
same-host fast path, an immutable shared-memory `Segment` the store took over) that replaces any
previous one in a single dict assignment under the lock, so a reader gets either the old value
or the new one, never half a write. Nothing is evicted: when the store is full a put is refused
(`StoreFullError`) and the scheduler recomputes that job instead of swapping it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Bytes per element of each dtype a worker may swap out (torch's names).
DTYPE_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


class FieldError(ValueError):
    """A key or meta field is invalid; `field` names it (e.g. "shape") for the caller."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class StoreFullError(Exception):
    """The value does not fit in the remaining capacity."""


@dataclass(frozen=True, slots=True)
class BlockKey:
    """One job's KV block group on one pipeline stage."""

    job_id: str
    stage_index: int
    block_id: int

    def __post_init__(self) -> None:
        if not self.job_id:
            raise FieldError("job_id", "must not be empty")
        if self.stage_index < 0:
            raise FieldError("stage_index", f"must be >= 0, got {self.stage_index}")
        if self.block_id < 0:
            raise FieldError("block_id", f"must be >= 0, got {self.block_id}")


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What a reader needs to rebuild the tensor from the bytes."""

    dtype: str  # a key of DTYPE_SIZES
    shape: tuple[int, ...]  # dimensions; () is a scalar
    total_bytes: int  # product(shape) * DTYPE_SIZES[dtype]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))  # hashable even when given a list
        if self.dtype not in DTYPE_SIZES:
            raise FieldError("dtype", f"unknown dtype {self.dtype!r}; known: {sorted(DTYPE_SIZES)}")
        if any(dim < 0 for dim in self.shape):
            raise FieldError("shape", f"dimensions must be >= 0, got {list(self.shape)}")
        expected = math.prod(self.shape) * DTYPE_SIZES[self.dtype]
        if expected != self.total_bytes:
            raise FieldError(
                "shape",
                f"shape {list(self.shape)} of {self.dtype} is {expected} bytes, "
                f"but total_bytes is {self.total_bytes}",
            )


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot of usage and of traffic since the store was created."""

    backend: str  # "memory" or "redis"
    num_entries: int
    used_bytes: int
    capacity_bytes: int
    num_puts: int  # puts stored
    num_gets: int  # gets answered, hits and misses
    num_misses: int
    num_rejected_puts: int  # puts refused for capacity
    bytes_in: int
    bytes_out: int


class KVBackend(Protocol):
    """A bounded store of block groups. Implementations are safe to call from many threads."""

    def check_put(self, key: BlockKey, num_bytes: int) -> None:
        """Raises `StoreFullError` (counted as a rejected put) when a value of `num_bytes` under
        `key` would not fit now, so a server can refuse before receiving the bytes. `put` checks
        again, since other writers may fill the store meanwhile."""
        ...

    def put(self, key: BlockKey, meta: TensorMeta, data: bytes) -> None:
        """Stores `data`, replacing any value under `key`; visible to `get` only once stored.
        Raises `StoreFullError` when it does not fit, `ValueError` when `data` is not
        `meta.total_bytes` long."""
        ...

    def get(self, key: BlockKey) -> tuple[TensorMeta, bytes] | None:
        """The stored value, or None when missing."""
        ...

    def delete(self, key: BlockKey) -> bool:
        """Deletes one value; whether it existed."""
        ...

    def delete_job(self, job_id: str) -> int:
        """Deletes every value of a job on every stage; how many there were."""
        ...

    def stats(self) -> StoreStats: ...

    def close(self) -> None:
        """Releases what the store holds outside itself (connections, shared-memory files)."""
        ...


class Segment(Protocol):
    """A shared-memory file holding exactly one value, owned by the store
    (services.kvstore.shm.ShmSegment). Immutable once the store took it over."""

    @property
    def name(self) -> str:
        """File name inside the store's shm directory."""
        ...

    def __len__(self) -> int: ...

    def read(self) -> bytes:
        """A copy of the bytes; FileNotFoundError once released."""
        ...

    def release(self) -> None:
        """The store no longer needs it: recycle the file or remove it; a no-op when gone."""
        ...


@runtime_checkable
class SegmentBackend(KVBackend, Protocol):
    """A backend that can keep values in shared memory as they are (zero copy)."""

    def put_segment(self, key: BlockKey, meta: TensorMeta, segment: Segment) -> None:
        """Like `put`, taking ownership of `segment` only when it returns (releasing it on
        delete, on replacement and on `close`); on `StoreFullError` the caller keeps it."""
        ...

    def get_segment(self, key: BlockKey) -> tuple[TensorMeta, bytes | Segment] | None:
        """Like `get`, but a value kept in shared memory comes back as its segment."""
        ...


class MemoryBackend:
    """Values in a dict in this process, guarded by one lock."""

    name = "memory"

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._values: dict[BlockKey, tuple[TensorMeta, bytes | Segment]] = {}
        self._keys_by_job: dict[str, set[BlockKey]] = {}
        self._used_bytes = 0
        self._num_puts = 0
        self._num_gets = 0
        self._num_misses = 0
        self._num_rejected_puts = 0
        self._bytes_in = 0
        self._bytes_out = 0

    def check_put(self, key: BlockKey, num_bytes: int) -> None:
        with self._lock:
            self._check_fits_locked(key, num_bytes)

    def put(self, key: BlockKey, meta: TensorMeta, data: bytes) -> None:
        if len(data) != meta.total_bytes:
            raise ValueError(f"got {len(data)} bytes, meta.total_bytes is {meta.total_bytes}")
        self._store(key, meta, bytes(data))  # NOTE: a caller's buffer must not alias readers'

    def put_segment(self, key: BlockKey, meta: TensorMeta, segment: Segment) -> None:
        if len(segment) != meta.total_bytes:
            raise ValueError(f"got {len(segment)} bytes, meta.total_bytes is {meta.total_bytes}")
        self._store(key, meta, segment)

    def get(self, key: BlockKey) -> tuple[TensorMeta, bytes] | None:
        value = self.get_segment(key)
        if value is None or isinstance(value[1], bytes):
            return value  # type: ignore[return-value]
        try:
            return value[0], value[1].read()
        except FileNotFoundError:
            return None  # deleted after the lookup: as if the get came after the delete

    def get_segment(self, key: BlockKey) -> tuple[TensorMeta, bytes | Segment] | None:
        with self._lock:
            self._num_gets += 1
            value = self._values.get(key)
            if value is None:
                self._num_misses += 1
                return None
            self._bytes_out += len(value[1])
            return value

    def delete(self, key: BlockKey) -> bool:
        with self._lock:
            if key not in self._values:
                return False
            removed = self._remove_locked(key)
        _release(removed)
        return True

    def delete_job(self, job_id: str) -> int:
        with self._lock:
            keys = self._keys_by_job.get(job_id, set()).copy()
            removed = [self._remove_locked(key) for key in keys]
        for payload in removed:
            _release(payload)
        return len(keys)

    def close(self) -> None:
        """Releases the shared-memory files of the values; the store is empty afterwards."""
        with self._lock:
            removed = [self._remove_locked(key) for key in list(self._values)]
        for payload in removed:
            _release(payload)

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                backend=self.name,
                num_entries=len(self._values),
                used_bytes=self._used_bytes,
                capacity_bytes=self.capacity_bytes,
                num_puts=self._num_puts,
                num_gets=self._num_gets,
                num_misses=self._num_misses,
                num_rejected_puts=self._num_rejected_puts,
                bytes_in=self._bytes_in,
                bytes_out=self._bytes_out,
            )

    def _check_fits_locked(self, key: BlockKey, num_bytes: int) -> None:
        # A replaced value's bytes are freed by the put, so they count as available.
        free_bytes = self.capacity_bytes - self._used_bytes + self._stored_bytes_locked(key)
        if num_bytes > free_bytes:
            self._num_rejected_puts += 1
            raise StoreFullError(
                f"{num_bytes} bytes do not fit: {self._used_bytes} of "
                f"{self.capacity_bytes} bytes in use"
            )

    def _store(self, key: BlockKey, meta: TensorMeta, payload: bytes | Segment) -> None:
        with self._lock:
            self._check_fits_locked(key, len(payload))
            self._used_bytes += len(payload) - self._stored_bytes_locked(key)
            previous = self._values.get(key)
            self._values[key] = (meta, payload)
            self._keys_by_job.setdefault(key.job_id, set()).add(key)
            self._num_puts += 1
            self._bytes_in += len(payload)
        if previous is not None:
            _release(previous[1])

    def _stored_bytes_locked(self, key: BlockKey) -> int:
        value = self._values.get(key)
        return 0 if value is None else len(value[1])

    def _remove_locked(self, key: BlockKey) -> bytes | Segment:
        _, payload = self._values.pop(key)
        self._used_bytes -= len(payload)
        job_keys = self._keys_by_job[key.job_id]
        job_keys.discard(key)
        if not job_keys:
            del self._keys_by_job[key.job_id]
        return payload


def _release(payload: bytes | Segment) -> None:
    """Frees a value's shared memory. Outside the lock: removing a large file takes a while."""
    if not isinstance(payload, bytes):
        payload.release()
