"""Swap bandwidth of the worker's real path against a plain memcpy of the same bytes.

For each size, one job's blocks go device pool -> kvstore (Swapper.swap_out) and back
(Swapper.swap_in) through a kvstore process started here, as `fastserve up` runs it (same
host: the shared-memory fast path; `--grpc` starts it without shm, so bytes stream over gRPC),
timed from the command to the reported completion.
Next to it, in the same run, a plain memcpy of the same bytes: one-thread torch copies between
the pool and a host buffer allocated once (pool -> host, host -> pool), no page faults timed.
Usage: .venv/bin/python -m bench.swap_bandwidth [--sizes-mib 1,4,16,64] [--grpc]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from services.worker.kv_cache import KVCache
from services.worker.swapper import Swapper
from testing.kvstore_process import start_kvstore, stop_kvstore

ROUNDS = 5


def wait(swapper: Swapper) -> list:
    while True:
        done = swapper.poll()
        if done:
            return done
        time.sleep(0.0002)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1,4,16,64")
    parser.add_argument("--grpc", action="store_true", help="force gRPC instead of shm")
    args = parser.parse_args()
    kvstore = start_kvstore(
        "--capacity-bytes", str(1 << 34), "--log-level", "warning",
        *(("--shm-dir", "") if args.grpc else ()),
    )  # fmt: skip
    # SmolLM2-135M's shape: 30 layers, 3 KV heads of 64, blocks of 16 tokens (737 KiB a block).
    block_mib = 30 * 2 * 16 * 3 * 64 * 4 / (1 << 20)
    sizes = [float(s) for s in args.sizes_mib.split(",")]
    num_blocks = int(max(sizes) / block_mib) * 2 + 2
    cache = KVCache(
        num_blocks=num_blocks, num_layers=30, block_size=16, num_kv_heads=3, head_dim=64,
        dtype=torch.float32, device="cpu",
    )  # fmt: skip
    cache.data.normal_()
    swapper = Swapper(cache, kvstore.address)
    num_threads = torch.get_num_threads()
    print(f"path: {'grpc' if args.grpc else 'shm (same host)'}; block = {block_mib:.2f} MiB")
    print("| MiB | swap out GB/s | swap in GB/s | memcpy out GB/s | memcpy in GB/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in sizes:
        n = max(1, round(size / block_mib))
        src, dst = list(range(n)), list(range(n, 2 * n))
        nbytes = n * cache.block_bytes
        src_index, dst_index = torch.tensor(src), torch.tensor(dst)
        host = torch.empty((n, *cache.data.shape[1:]), dtype=cache.dtype)
        host.zero_()  # touch every page once, before timing
        outs, ins, copy_out, copy_in = [], [], [], []
        for r in range(ROUNDS):
            job = f"bench-{size}-{r}"
            started = time.perf_counter()
            swapper.swap_out(job, src)
            (done,) = wait(swapper)
            assert done.ok, done.error
            outs.append(time.perf_counter() - started)
            started = time.perf_counter()
            swapper.swap_in(job, dst)
            (done,) = wait(swapper)
            assert done.ok, done.error
            ins.append(time.perf_counter() - started)
            assert torch.equal(cache.data[dst], cache.data[src])
            torch.set_num_threads(1)  # a plain memcpy: one thread
            started = time.perf_counter()
            torch.index_select(cache.data, 0, src_index, out=host)
            copy_out.append(time.perf_counter() - started)
            started = time.perf_counter()
            cache.data.index_copy_(0, dst_index, host)
            copy_in.append(time.perf_counter() - started)
            torch.set_num_threads(num_threads)
        gbps = [nbytes / statistics.median(t) / 1e9 for t in (outs, ins, copy_out, copy_in)]
        ratio = (gbps[0] + gbps[1]) / (gbps[2] + gbps[3])
        print(
            f"| {nbytes / (1 << 20):.1f} | {gbps[0]:.2f} | {gbps[1]:.2f} | {gbps[2]:.2f} | "
            f"{gbps[3]:.2f} | {ratio:.2f} |",
            flush=True,
        )
    swapper.close()
    stop_kvstore(kvstore)


if __name__ == "__main__":
    main()
