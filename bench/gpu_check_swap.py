"""The swap step of `bench.gpu_check`: the worker's swap path against plain pinned copies."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench.gpu_check_common import BLOCK_SIZE, Result, cuda_mode, sync


def timed_swap(swapper: Any, start: Any, job: str, blocks: list[int]) -> float:
    """Seconds from starting a swap (`swapper.swap_out` or `swap_in`) to its reported end."""
    from bench.swap_bandwidth import wait

    started = time.perf_counter()
    start(job, blocks)
    (done,) = wait(swapper)
    if not done.ok:
        raise RuntimeError(f"{start.__name__} failed: {done.error}")
    return time.perf_counter() - started


def step_swap(args: argparse.Namespace) -> Result:
    import torch

    from services.worker.kv_cache import KVCache
    from services.worker.swapper import Swapper
    from testing.kvstore_process import start_kvstore, stop_kvstore

    gpu = cuda_mode(args)
    device = "cuda" if gpu else "cpu"
    if gpu:  # the 1B shape's blocks in bfloat16: 16 layers, 8 KV heads of 64 (512 KiB a block)
        layers, heads, dim, dtype = 16, 8, 64, torch.bfloat16
        sizes = [1.0, 4.0, 16.0, 64.0] if not args.quick else [4.0, 16.0]
    else:  # SmolLM2-135M's, float32 (737 KiB)
        layers, heads, dim, dtype = 30, 3, 64, torch.float32
        sizes = [1.0, 4.0]
    rounds = 3 if args.quick or not gpu else 5
    element = torch.empty((), dtype=dtype).element_size()
    block_bytes = layers * 2 * BLOCK_SIZE * heads * dim * element
    num_blocks = int(max(sizes) * (1 << 20) / block_bytes) * 2 + 2
    kvstore = start_kvstore("--capacity-bytes", str(1 << 33), "--log-level", "warning")
    cache = KVCache(
        num_blocks=num_blocks, num_layers=layers, block_size=BLOCK_SIZE, num_kv_heads=heads,
        head_dim=dim, dtype=dtype, device=device,
    )  # fmt: skip
    cache.data.normal_()
    swapper = Swapper(cache, kvstore.address)
    rows = []
    try:
        for size in sizes:
            n = max(1, round(size * (1 << 20) / block_bytes))
            src, dst = list(range(n)), list(range(n, 2 * n))
            nbytes = n * cache.block_bytes
            host = torch.empty((n, *cache.data.shape[1:]), dtype=dtype, pin_memory=gpu)
            host.zero_()
            outs, ins, copy_out, copy_in = [], [], [], []
            for r in range(rounds + 1):  # the first round warms up
                job = f"check-{size}-{r}"
                out_s = timed_swap(swapper, swapper.swap_out, job, src)
                in_s = timed_swap(swapper, swapper.swap_in, job, dst)
                if not torch.equal(cache.data[dst], cache.data[src]):
                    raise RuntimeError("swapped-in blocks differ from the swapped-out ones")
                # Plain copies of the same bytes: the pool's first n blocks (contiguous) to and
                # from a host buffer allocated once (pinned on CUDA; on CPU a one-thread memcpy,
                # as bench/swap_bandwidth.py's).
                threads = torch.get_num_threads()
                if not gpu:
                    torch.set_num_threads(1)
                sync(device)
                started = time.perf_counter()
                host.copy_(cache.data[:n])
                sync(device)
                c_out = time.perf_counter() - started
                started = time.perf_counter()
                cache.data[n : 2 * n].copy_(host)
                sync(device)
                c_in = time.perf_counter() - started
                torch.set_num_threads(threads)
                if r:
                    outs.append(out_s)
                    ins.append(in_s)
                    copy_out.append(c_out)
                    copy_in.append(c_in)
            gbps = [nbytes / statistics.median(t) / 1e9 for t in (outs, ins, copy_out, copy_in)]
            rows.append(
                {
                    "mib": nbytes / (1 << 20),
                    "swap_out_gbps": gbps[0],
                    "swap_in_gbps": gbps[1],
                    "copy_out_gbps": gbps[2],
                    "copy_in_gbps": gbps[3],
                    "out_ratio": gbps[0] / gbps[2],
                    "in_ratio": gbps[1] / gbps[3],
                }
            )
            print(rows[-1], flush=True)
    finally:
        swapper.close()
        stop_kvstore(kvstore)
    large = [r for r in rows if r["mib"] >= 4]
    worst = min((min(r["out_ratio"], r["in_ratio"]) for r in large), default=None)
    return {
        "status": "ok",
        "summary": f"{len(rows)} sizes; swaps of >= 4 MiB at {100 * (worst or 0):.0f}% or more "
        f"of the plain {'pinned ' if gpu else ''}copies",
        "device": device,
        "pinned": gpu,
        "block_bytes": block_bytes,
        "rounds": rounds,
        "rows": rows,
        "worst_ratio_at_4mib_or_more": worst,
    }
