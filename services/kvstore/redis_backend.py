"""A `KVBackend` on Redis, so swapped-out KV can live outside the kvstore process.

Each block group is ONE Redis string, written by one Lua script, so a reader gets the whole value
or nothing: a small header (magic, dtype, shape, payload length) followed by the payload. Every
value read is checked against its header before it is returned; a value that does not check out
(written by something else, truncated, garbage) is deleted and reported as a miss, as is a key
Redis itself evicted under its maxmemory policy. A miss costs the scheduler a recompute; garbage
would cost a wrong answer.

Keys, all under `prefix`:
  {prefix}v:{job_id}:{stage}:{block}  a value: header + payload
  {prefix}job:{job_id}                set of the job's value keys, for delete_job
  {prefix}sizes                       hash: value key -> payload bytes counted in `used`
  {prefix}used                        payload bytes held, checked against capacity_bytes

Capacity is enforced inside the put script, so concurrent writers (threads, or several kvstores
sharing one Redis and prefix) never overshoot it together.

NOTE: with an evicting maxmemory policy (allkeys-lru) Redis may drop any key, bookkeeping
included (its LRU clock ticks once a second, so keys written together are evicted at random). A
value's entry in `sizes` is reconciled when a get or delete finds the value gone; a lost `sizes`
hash resets `used` to 0; a lost `used` restarts from 0: counts can be low, never stuck high. A
job set may be lost or partial, so once Redis reports evictions delete_job also SCANs. Prefer
`noeviction` (refusals then surface as StoreFullError) with capacity_bytes below Redis's
maxmemory. The scripts touch keys they are not passed: a single Redis, not Redis Cluster.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
from urllib.parse import urlsplit, urlunsplit

import redis

from services.kvstore.backend import (
    DTYPE_SIZES,
    BlockKey,
    FieldError,
    StoreFullError,
    StoreStats,
    TensorMeta,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "fastserve:kv:"
MAGIC = b"FSKV"
VERSION = 1
# magic, version, len(dtype), ndim, a zero byte, total_bytes; then dtype (ascii), ndim x u64.
HEADER = struct.Struct("<4sBBBxQ")
MAX_NDIM = 255
# Bytes compared before deleting a value that failed its check, so a good value written
# meanwhile is not deleted with it.
FINGERPRINT_BYTES = 64

# Bookkeeping when a value is gone: KEYS = value, sizes, used, job set.
_FORGET = """
local old = redis.call('HGET', KEYS[2], KEYS[1])
if old then
  redis.call('HDEL', KEYS[2], KEYS[1])
  redis.call('DECRBY', KEYS[3], old)
end
redis.call('SREM', KEYS[4], KEYS[1])
"""

# KEYS = value, sizes, used, job set; ARGV = header, payload, payload bytes, capacity bytes.
# Returns {1, used} when stored, {0, used} when it does not fit.
_PUT = """
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if used ~= 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  used = 0  -- the sizes hash was evicted: nothing is accounted any more
  redis.call('SET', KEYS[3], 0)
end
local old = tonumber(redis.call('HGET', KEYS[2], KEYS[1]) or '0')
local n = tonumber(ARGV[3])
if used - old + n > tonumber(ARGV[4]) then
  return {0, used}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('APPEND', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], KEYS[1], n)
redis.call('INCRBY', KEYS[3], n - old)
redis.call('SADD', KEYS[4], KEYS[1])
return {1, used - old + n}
"""

# KEYS = value, sizes, used, job set. Returns 1 when the value existed.
_DELETE = "local existed = redis.call('DEL', KEYS[1])" + _FORGET + "return existed"

# After a miss: forget the value's bookkeeping unless it was written again meanwhile.
_FORGET_IF_MISSING = (
    "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end" + _FORGET + "return 1"
)

# After a bad value: delete it if it is still the one read (same length and first bytes).
# ARGV = length, first FINGERPRINT_BYTES bytes.
_DROP_IF_SAME = f"""
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[1]) then return 0 end
if redis.call('GETRANGE', KEYS[1], 0, {FINGERPRINT_BYTES - 1}) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
{_FORGET}
return 1
"""

# KEYS = job set, sizes, used. Returns how many of the job's values existed.
_DELETE_JOB = """
local num_deleted = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  num_deleted = num_deleted + redis.call('DEL', key)
  local old = redis.call('HGET', KEYS[2], key)
  if old then
    redis.call('HDEL', KEYS[2], key)
    redis.call('DECRBY', KEYS[3], old)
  end
end
redis.call('DEL', KEYS[1])
return num_deleted
"""


def encode_header(meta: TensorMeta) -> bytes:
    dtype = meta.dtype.encode("ascii")
    if len(meta.shape) > MAX_NDIM:
        raise FieldError("shape", f"at most {MAX_NDIM} dimensions, got {len(meta.shape)}")
    return (
        HEADER.pack(MAGIC, VERSION, len(dtype), len(meta.shape), meta.total_bytes)
        + dtype
        + struct.pack(f"<{len(meta.shape)}Q", *meta.shape)
    )


def decode_header(value: bytes) -> tuple[TensorMeta, int] | None:
    """The meta and the payload's offset, or None unless `value` is a header followed by exactly
    the payload it announces, with a dtype and shape that agree with its length."""
    if len(value) < HEADER.size:
        return None
    magic, version, dtype_len, ndim, total_bytes = HEADER.unpack_from(value)
    offset = HEADER.size + dtype_len + 8 * ndim
    if magic != MAGIC or version != VERSION or len(value) != offset + total_bytes:
        return None
    try:
        dtype = value[HEADER.size : HEADER.size + dtype_len].decode("ascii")
        shape = struct.unpack_from(f"<{ndim}Q", value, HEADER.size + dtype_len)
    except (UnicodeDecodeError, struct.error):
        return None
    if dtype not in DTYPE_SIZES or math.prod(shape) * DTYPE_SIZES[dtype] != total_bytes:
        return None
    return TensorMeta(dtype=dtype, shape=shape, total_bytes=total_bytes), offset


def _glob_escape(text: str) -> str:
    """`text` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def redact_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisBackend:
    """Values in a Redis server; safe to call from many threads (one connection pool)."""

    name = "redis"

    def __init__(self, url: str, capacity_bytes: int, prefix: str = DEFAULT_PREFIX) -> None:
        """Connects and pings, so a wrong URL fails here: redis.RedisError when unreachable."""
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.url = url
        self.capacity_bytes = capacity_bytes
        self.prefix = prefix
        self._redis = redis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=60, health_check_interval=30
        )
        self._redis.ping()
        self._sizes_key = f"{prefix}sizes"
        self._used_key = f"{prefix}used"
        self._put_script = self._redis.register_script(_PUT)
        self._delete_script = self._redis.register_script(_DELETE)
        self._forget_script = self._redis.register_script(_FORGET_IF_MISSING)
        self._drop_script = self._redis.register_script(_DROP_IF_SAME)
        self._delete_job_script = self._redis.register_script(_DELETE_JOB)
        self._evicted = False  # Redis reported evictions: bookkeeping may be incomplete
        self._lock = threading.Lock()  # guards the traffic counters below
        self._num_puts = 0
        self._num_gets = 0
        self._num_misses = 0
        self._num_rejected_puts = 0
        self._bytes_in = 0
        self._bytes_out = 0

    def check_put(self, key: BlockKey, num_bytes: int) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._used_key)
        pipe.hget(self._sizes_key, self.value_key(key))
        used, old = pipe.execute()
        used_bytes = int(used or 0)
        if used_bytes - int(old or 0) + num_bytes > self.capacity_bytes:
            self._reject(num_bytes, used_bytes)

    def put(self, key: BlockKey, meta: TensorMeta, data: bytes) -> None:
        if len(data) != meta.total_bytes:
            raise ValueError(f"got {len(data)} bytes, meta.total_bytes is {meta.total_bytes}")
        try:
            stored, used_bytes = self._put_script(
                keys=self._bookkeeping_keys(key),
                args=[encode_header(meta), data, meta.total_bytes, self.capacity_bytes],
            )
        except redis.ResponseError as exc:
            if "OOM" not in str(exc):
                raise
            with self._lock:
                self._num_rejected_puts += 1
            raise StoreFullError(f"redis refused the write: {exc}") from exc
        if not stored:
            self._reject(meta.total_bytes, int(used_bytes))
        with self._lock:
            self._num_puts += 1
            self._bytes_in += meta.total_bytes

    def get(self, key: BlockKey) -> tuple[TensorMeta, bytes] | None:
        value_key = self.value_key(key)
        value: bytes | None = self._redis.get(value_key)  # type: ignore[assignment]
        decoded = None if value is None else decode_header(value)
        if value is None:
            self._forget_script(keys=self._bookkeeping_keys(key))
        elif decoded is None:
            log.warning("dropping %s: %d bytes, not a valid block group", value_key, len(value))
            self._drop_script(
                keys=self._bookkeeping_keys(key), args=[len(value), value[:FINGERPRINT_BYTES]]
            )
        with self._lock:
            self._num_gets += 1
            if decoded is None:
                self._num_misses += 1
                return None
            self._bytes_out += decoded[0].total_bytes
        assert value is not None
        meta, offset = decoded
        return meta, value[offset:]

    def delete(self, key: BlockKey) -> bool:
        return bool(self._delete_script(keys=self._bookkeeping_keys(key)))

    def delete_job(self, job_id: str) -> int:
        keys = [self._job_key(job_id), self._sizes_key, self._used_key]
        num_deleted = self._delete_job_script(keys=keys)
        if self._evictions_seen():
            # Redis may have evicted the job set (and SADDs since made a new, partial one) while
            # some values survived: find those by name.
            pattern = _glob_escape(f"{self.prefix}v:{job_id}:") + "*"
            for value_key in self._redis.scan_iter(match=pattern, count=1000):
                job, stage, block = (
                    value_key.decode().removeprefix(f"{self.prefix}v:").rsplit(":", 2)
                )
                if job == job_id:
                    num_deleted += self.delete(BlockKey(job, int(stage), int(block)))
        return int(num_deleted)

    def stats(self) -> StoreStats:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(self._used_key)
        pipe.hlen(self._sizes_key)
        used, num_entries = pipe.execute()
        used_bytes = int(used or 0) if num_entries else 0  # no sizes hash: nothing is counted
        with self._lock:
            return StoreStats(
                backend=self.name,
                num_entries=int(num_entries),
                used_bytes=max(0, used_bytes),
                capacity_bytes=self.capacity_bytes,
                num_puts=self._num_puts,
                num_gets=self._num_gets,
                num_misses=self._num_misses,
                num_rejected_puts=self._num_rejected_puts,
                bytes_in=self._bytes_in,
                bytes_out=self._bytes_out,
            )

    def close(self) -> None:
        self._redis.close()

    def _evictions_seen(self) -> bool:
        """Whether Redis has evicted keys since it started; sticky once true."""
        if not self._evicted:
            self._evicted = int(self._redis.info("stats").get("evicted_keys", 0)) > 0
        return self._evicted

    def _reject(self, num_bytes: int, used_bytes: int) -> None:
        with self._lock:
            self._num_rejected_puts += 1
        raise StoreFullError(
            f"{num_bytes} bytes do not fit: {used_bytes} of {self.capacity_bytes} bytes in use"
        )

    def value_key(self, key: BlockKey) -> str:
        """The Redis key of a value."""
        # job_id may hold ':'; stage and block are the last two fields, so the key is unambiguous.
        return f"{self.prefix}v:{key.job_id}:{key.stage_index}:{key.block_id}"

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _bookkeeping_keys(self, key: BlockKey) -> list[str]:
        return [self.value_key(key), self._sizes_key, self._used_key, self._job_key(key.job_id)]
