"""Moves jobs' KV blocks between this stage's device pool and the kvstore, in the background.

Swap-out: the blocks are copied off the device at once (the next step may reuse them), then
handed to the kvstore by a background thread. Swap-in: a background thread reads the blocks
from the kvstore and writes them into the device blocks the scheduler allocated, while steps
run on other blocks; the scheduler runs the job only after a Result reports the swap done, so
no step waits for a swap. One kvstore value per (job, stage) holds all of the job's blocks.

On CPU with the kvstore on this host, each direction is one copy: swap-out writes the pool's
blocks straight into a shared-memory file (one pwritev over views of the pool), swap-in reads
the file straight into the allocated blocks (one preadv); only the file's name crosses gRPC.
(A fresh host tensor's page faults cost more than the copies: docs/results/kv-swapping.md.)

On CUDA, host buffers are pinned and device copies run on a separate stream, so they overlap
compute; the copy is complete (event synchronised) before a swap is reported done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from services.kvstore.backend import BlockKey, StoreFullError, TensorMeta
from services.kvstore.client import KVStoreClient, Staged
from services.worker.command import SwapDone
from services.worker.kv_cache import KVCache

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class Swapper:
    def __init__(
        self, cache: KVCache, kvstore_address: str, stage_index: int = 0, num_threads: int = 2
    ) -> None:
        self.cache = cache
        self.stage_index = stage_index
        self.client = KVStoreClient(kvstore_address)
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="swap")
        self._in_flight: list[Future[SwapDone]] = []
        self._swapping_in: dict[str, Future[SwapDone]] = {}  # job -> its latest swap-in
        # Each swap-out writes a new generation of the job's value (BlockKey.block_id), and
        # deletes name one generation: a late delete of an old copy, running on another
        # thread, can never remove the copy a newer swap-out just wrote.
        self._next_generation = 0  # unique over the process, so never reused by any job
        self._putting: set[str] = set()  # jobs whose swap-out is writing
        self._dropped: set[str] = set()  # of those, jobs forgotten meanwhile
        self._stored: dict[str, int] = {}  # job -> generation held in the kvstore
        self._lock = threading.Lock()
        self._cuda = cache.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(cache.device) if self._cuda else None

    @property
    def num_in_flight(self) -> int:
        return sum(1 for future in self._in_flight if not future.done())

    def _key(self, job_id: str, generation: int) -> BlockKey:
        return BlockKey(job_id=job_id, stage_index=self.stage_index, block_id=generation)

    def swap_out(self, job_id: str, block_ids: Sequence[int]) -> None:
        started = time.perf_counter()
        with self._lock:
            generation = self._next_generation
            self._next_generation += 1
            self._putting.add(job_id)
        if self._cuda:
            host, ready = self._copy_to_host(block_ids)
            future = self._pool.submit(self._put, job_id, generation, host, ready, started)
        else:
            try:
                staged = self._stage(block_ids)  # the one copy, now: the blocks may be reused
            except Exception as exc:
                self._end_put(job_id, None)
                future = Future()
                future.set_result(SwapDone(job_id, False, False, f"swap-out failed: {exc}"))
            else:
                future = self._pool.submit(self._commit, job_id, generation, staged, started)
        self._in_flight.append(future)

    def swap_in(self, job_id: str, block_ids: Sequence[int]) -> None:
        started = time.perf_counter()
        with self._lock:
            generation = self._stored.get(job_id, -1)
        future = self._pool.submit(self._get, job_id, generation, list(block_ids), started)
        self._in_flight.append(future)
        self._swapping_in[job_id] = future

    def settle(self, job_ids: Iterable[str], timeout_s: float = 30.0) -> None:
        """Waits for the swap-ins of `job_ids` still writing into their blocks, so the blocks
        can be released: the next job to get them must not see a late write."""
        for job_id in job_ids:
            future = self._swapping_in.pop(job_id, None)
            if future is not None and not future.done():
                try:
                    future.result(timeout=timeout_s)
                except Exception as exc:  # its SwapDone reports it; here only the wait matters
                    log.debug("swap-in of %s: %s", job_id, exc)

    def poll(self) -> list[SwapDone]:
        """Swaps finished since the last poll."""
        done = [future for future in self._in_flight if future.done()]
        self._in_flight = [future for future in self._in_flight if not future.done()]
        self._swapping_in = {j: f for j, f in self._swapping_in.items() if not f.done()}
        return [future.result() for future in done]

    def forget(self, job_ids: Iterable[str]) -> None:
        """Drops the kvstore copies of jobs that finished or were recomputed (background)."""
        with self._lock:
            job_ids = list(job_ids)
            stored = [(j, self._stored.pop(j)) for j in job_ids if j in self._stored]
            self._dropped.update(j for j in job_ids if j in self._putting)
        for job_id, generation in stored:
            self._pool.submit(self._delete, job_id, generation)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- background work -------------------------------------------------------------------

    def _copy_to_host(self, block_ids: Sequence[int]) -> tuple[torch.Tensor, object]:
        """CUDA: gathers the blocks on the compute stream, copies them to a pinned host tensor
        on the copy stream; returns it with the event that marks the copy done."""
        assert self._copy_stream is not None
        index = torch.as_tensor(list(block_ids), device=self.cache.device)
        gathered = self.cache.data.index_select(0, index)  # on the compute stream
        host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(self._copy_stream):
            host.copy_(gathered, non_blocking=True)
            gathered.record_stream(self._copy_stream)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return host, event

    def _stage(self, block_ids: Sequence[int]) -> Staged:
        """Copies the blocks out of the CPU pool into what the kvstore will hold (its shared
        memory on this host), in one pass."""
        views = self.cache.block_views(block_ids)
        shape = (len(block_ids), *self.cache.data.shape[1:])
        meta = TensorMeta(
            dtype=_DTYPE_NAMES[self.cache.dtype],
            shape=shape,
            total_bytes=sum(view.nbytes for view in views),
        )
        return self.client.stage(meta, views)

    def _commit(self, job_id: str, generation: int, staged: Staged, started: float) -> SwapDone:
        return self._store(
            job_id,
            generation,
            started,
            lambda key: self.client.commit(staged, key),
            staged.meta.total_bytes,
        )

    def _put(
        self, job_id: str, generation: int, host: torch.Tensor, ready, started: float
    ) -> SwapDone:
        num_bytes = host.numel() * host.element_size()

        def put(key: BlockKey) -> int:
            ready.synchronize()  # inside _store: a failed device copy fails the swap, no more
            data = host.contiguous().view(torch.uint8).numpy()
            meta = TensorMeta(
                dtype=_DTYPE_NAMES[host.dtype], shape=tuple(host.shape), total_bytes=num_bytes
            )
            return self.client.put_bytes(key, meta, memoryview(data))

        return self._store(job_id, generation, started, put, num_bytes)

    def _store(
        self,
        job_id: str,
        generation: int,
        started: float,
        put: Callable[[BlockKey], int],
        num_bytes: int,
    ) -> SwapDone:
        try:
            put(self._key(job_id, generation))
        except StoreFullError as exc:
            self._end_put(job_id, None)
            return SwapDone(job_id, False, False, f"kvstore full: {exc}")
        except Exception as exc:  # the kvstore is down or refused: the job is recomputed
            self._end_put(job_id, None)
            return SwapDone(job_id, False, False, f"swap-out failed: {exc}")
        if self._end_put(job_id, generation):  # the job ended meanwhile: nobody reads this
            self._delete(job_id, generation)
        return SwapDone(job_id, False, True, "", num_bytes, time.perf_counter() - started)

    def _end_put(self, job_id: str, generation: int | None) -> bool:
        """Records a finished swap-out; True when the job was forgotten while it ran."""
        with self._lock:
            self._putting.discard(job_id)
            dropped = job_id in self._dropped
            self._dropped.discard(job_id)
            if generation is not None and not dropped:
                self._stored[job_id] = generation
        return dropped

    def _get(self, job_id: str, generation: int, block_ids: list[int], started: float) -> SwapDone:
        expected = (len(block_ids), *self.cache.data.shape[1:])
        try:
            if generation < 0:
                return SwapDone(job_id, True, False, "blocks missing from the kvstore")
            key = self._key(job_id, generation)
            if self._cuda:
                # Into a pinned host tensor (one copy from the kvstore's shared memory), then
                # to the device on the copy stream.
                host = torch.empty(expected, dtype=self.cache.dtype, pin_memory=True)
                meta = self.client.get_into(key, host.view(torch.uint8).numpy().data)
            else:  # straight into the allocated blocks; nothing reads them until we report
                meta = self.client.get_into(key, self.cache.block_views(block_ids))
            if meta is None:
                return SwapDone(job_id, True, False, "blocks missing from the kvstore")
            if tuple(meta.shape) != expected or _DTYPES.get(meta.dtype) != self.cache.dtype:
                return SwapDone(job_id, True, False, f"kvstore holds {meta}, expected {expected}")
            if self._cuda:
                self._copy_to_device(block_ids, host)
        except Exception as exc:
            return SwapDone(job_id, True, False, f"swap-in failed: {exc}")
        # The device has it again; drop this copy (a later swap-out writes a new generation),
        # after reporting: the job need not wait for the delete.
        with self._lock:
            if self._stored.get(job_id) == generation:
                del self._stored[job_id]
        self._pool.submit(self._delete, job_id, generation)
        return SwapDone(job_id, True, True, "", meta.total_bytes, time.perf_counter() - started)

    def _copy_to_device(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        assert self._copy_stream is not None
        # After everything the compute stream has queued so far: a swap-out of the same
        # command may still be gathering these blocks (they were freed and handed to this job),
        # and the gather must read them before this copy overwrites them.
        self._copy_stream.wait_stream(torch.cuda.default_stream(self.cache.device))
        with torch.cuda.stream(self._copy_stream):
            self.cache.write_blocks(block_ids, blocks.to(self.cache.device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        event.synchronize()

    def _delete(self, job_id: str, generation: int) -> None:
        try:
            self.client.delete(self._key(job_id, generation))
        except Exception as exc:  # a lost kvstore has nothing to delete
            log.debug("kvstore delete of %s failed: %s", job_id, exc)
