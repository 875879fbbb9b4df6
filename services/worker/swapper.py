"""Moves jobs' KV blocks between this stage's device pool and the kvstore, in the background.

Swap-out: the blocks are copied off the device at once (the next step may reuse them), then
written to the kvstore by a background thread. Swap-in: a background thread reads the blocks
from the kvstore and writes them into the device blocks the scheduler allocated, while steps
run on other blocks; the scheduler runs the job only after a Result reports the swap done, so
no step waits for a swap. One kvstore value per (job, stage) holds all of the job's blocks.

On CUDA, host buffers are pinned and device copies run on a separate stream, so they overlap
compute; the copy is complete (event synchronised) before a swap is reported done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from services.kvstore.backend import BlockKey, StoreFullError, TensorMeta
from services.kvstore.client import KVStoreClient
from services.worker.kv_cache import KVCache

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


@dataclass(frozen=True, slots=True)
class SwapDone:
    job_id: str
    swap_in: bool  # False: a swap-out
    ok: bool
    error: str = ""
    num_bytes: int = 0
    duration_s: float = 0.0


class Swapper:
    def __init__(
        self, cache: KVCache, kvstore_address: str, stage_index: int = 0, num_threads: int = 2
    ) -> None:
        self.cache = cache
        self.stage_index = stage_index
        self.client = KVStoreClient(kvstore_address)
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="swap")
        self._in_flight: list[Future[SwapDone]] = []
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
        host, ready = self._copy_to_host(block_ids)
        self._in_flight.append(
            self._pool.submit(self._put, job_id, generation, host, ready, started)
        )

    def swap_in(self, job_id: str, block_ids: Sequence[int]) -> None:
        started = time.perf_counter()
        with self._lock:
            generation = self._stored.get(job_id, -1)
        self._in_flight.append(
            self._pool.submit(self._get, job_id, generation, list(block_ids), started)
        )

    def poll(self) -> list[SwapDone]:
        """Swaps finished since the last poll."""
        done = [future for future in self._in_flight if future.done()]
        self._in_flight = [future for future in self._in_flight if not future.done()]
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
        if not self._cuda:
            return self.cache.read_blocks(block_ids), None
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

    def _put(
        self, job_id: str, generation: int, host: torch.Tensor, ready, started: float
    ) -> SwapDone:
        try:
            if ready is not None:
                ready.synchronize()
            data = host.contiguous().view(torch.uint8).numpy()
            meta = TensorMeta(
                dtype=_DTYPE_NAMES[host.dtype], shape=tuple(host.shape), total_bytes=data.nbytes
            )
            self.client.put_bytes(self._key(job_id, generation), meta, memoryview(data))
        except StoreFullError as exc:
            self._end_put(job_id, None)
            return SwapDone(job_id, False, False, f"kvstore full: {exc}")
        except Exception as exc:  # the kvstore is down or refused: the job is recomputed
            self._end_put(job_id, None)
            return SwapDone(job_id, False, False, f"swap-out failed: {exc}")
        if self._end_put(job_id, generation):  # the job ended meanwhile: nobody reads this
            self._delete(job_id, generation)
        return SwapDone(job_id, False, True, "", data.nbytes, time.perf_counter() - started)

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
            # Read straight into a (pinned, on CUDA) host tensor of the expected shape: one copy
            # from the kvstore's shared memory, one to the device.
            host = torch.empty(expected, dtype=self.cache.dtype, pin_memory=self._cuda)
            key = self._key(job_id, generation)
            meta = self.client.get_into(key, host.view(torch.uint8).numpy().data)
            if meta is None:
                return SwapDone(job_id, True, False, "blocks missing from the kvstore")
            if tuple(meta.shape) != expected or _DTYPES.get(meta.dtype) != self.cache.dtype:
                return SwapDone(job_id, True, False, f"kvstore holds {meta}, expected {expected}")
            self._copy_to_device(block_ids, host)
        except Exception as exc:
            return SwapDone(job_id, True, False, f"swap-in failed: {exc}")
        # The device has it again; drop this copy (a later swap-out writes a new generation).
        with self._lock:
            if self._stored.get(job_id) == generation:
                del self._stored[job_id]
        self._delete(job_id, generation)
        return SwapDone(job_id, True, True, "", meta.total_bytes, time.perf_counter() - started)

    def _copy_to_device(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        if not self._cuda:
            self.cache.write_blocks(block_ids, blocks)
            return
        assert self._copy_stream is not None
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
