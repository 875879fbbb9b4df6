"""The worker's Swapper against a real kvstore process: blocks go out of the pool and come back
into other blocks byte-identical, through shared memory (one copy each way, straight from and
into the pool) and through gRPC streaming."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest
import torch

from services.worker.kv_cache import KVCache
from services.worker.swapper import SwapDone, Swapper
from testing.kvstore_process import KVStoreProcess, start_kvstore, stop_kvstore

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["shm", "grpc"])
def kvstore(request) -> Iterator[KVStoreProcess]:
    parent = "/dev/shm" if os.path.isdir("/dev/shm") else None
    shm_dir = tempfile.mkdtemp(prefix="fastserve-swapper-", dir=parent)
    flag = shm_dir if request.param == "shm" else ""
    store = start_kvstore("--shm-dir", flag, "--log-level", "warning")
    yield store
    stop_kvstore(store)
    shutil.rmtree(shm_dir, ignore_errors=True)


def make_cache(dtype: torch.dtype) -> KVCache:
    cache = KVCache(
        num_blocks=12, block_size=4, num_layers=3, num_kv_heads=2, head_dim=8, dtype=dtype
    )
    cache.data.copy_(torch.randn(cache.data.shape))
    return cache


def wait_done(swapper: Swapper, timeout_s: float = 20.0) -> SwapDone:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = swapper.poll()
        if done:
            (result,) = done
            return result
        time.sleep(0.001)
    raise AssertionError("swap did not finish")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_come_back_into_other_blocks_byte_identical(kvstore, dtype) -> None:
    cache = make_cache(dtype)
    swapper = Swapper(cache, kvstore.address)
    try:
        source = [2, 3, 5, 9]  # runs of consecutive blocks and single ones
        original = cache.data[source].clone()
        swapper.swap_out("job", source)
        cache.data[source] = 0  # the next step may reuse them at once
        out = wait_done(swapper)
        assert out.ok and not out.swap_in, out.error
        assert out.num_bytes == len(source) * cache.block_bytes

        target = [11, 0, 1, 7]
        swapper.swap_in("job", target)
        back = wait_done(swapper)
        assert back.ok and back.swap_in, back.error
        assert torch.equal(cache.data[target], original)
        # Read back once: the copy in the kvstore is gone.
        swapper.swap_in("job", target)
        missing = wait_done(swapper)
        assert not missing.ok and "missing" in missing.error
    finally:
        swapper.close()


def test_a_swap_in_of_another_shape_fails_instead_of_running_on_garbage(kvstore) -> None:
    cache = make_cache(torch.float32)
    swapper = Swapper(cache, kvstore.address)
    try:
        swapper.swap_out("short", [4, 5])
        assert wait_done(swapper).ok
        swapper.swap_in("short", [6, 7, 8])  # the scheduler asked for more blocks than it has
        result = wait_done(swapper)
        assert not result.ok and result.swap_in
    finally:
        swapper.close()


def test_settle_waits_until_a_swap_in_has_written_its_blocks(kvstore) -> None:
    """A job freed while its swap-in runs: the blocks are released only once it is written,
    so the next job to get them never sees a late write."""
    cache = make_cache(torch.float32)
    swapper = Swapper(cache, kvstore.address)
    try:
        original = cache.data[[1, 2, 3]].clone()
        swapper.swap_out("job", [1, 2, 3])
        assert wait_done(swapper).ok
        cache.data[[8, 9, 10]] = 0
        swapper.swap_in("job", [8, 9, 10])
        swapper.settle(["job"])
        assert torch.equal(cache.data[[8, 9, 10]], original)  # written before settle returned
        assert wait_done(swapper).ok  # and still reported to the scheduler
    finally:
        swapper.close()
