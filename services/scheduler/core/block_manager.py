"""KV block accounting. The scheduler hands out block ids; every stage uses the same ids for a
job, so a plan is exact and workers never decide anything."""

from __future__ import annotations

from collections import deque

from services.scheduler.core.job import Job


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Free list of device block ids; a job's block table grows as its tokens are computed."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def num_new_blocks(self, job: Job, num_new_tokens: int) -> int:
        """Blocks `job` must gain to hold `num_new_tokens` more computed tokens."""
        needed = num_blocks_for(job.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, needed - len(job.block_ids))

    def can_allocate(self, job: Job, num_new_tokens: int) -> bool:
        return self.num_new_blocks(job, num_new_tokens) <= len(self._free)

    def allocate(self, job: Job, num_new_tokens: int) -> None:
        num_new = self.num_new_blocks(job, num_new_tokens)
        if num_new > len(self._free):
            raise RuntimeError(f"job {job.job_id}: needs {num_new} blocks, {len(self._free)} free")
        job.block_ids.extend(self._free.popleft() for _ in range(num_new))

    def allocate_blocks(self, job: Job, num_blocks: int) -> None:
        """Gives a job `num_blocks` fresh blocks (to swap its KV back into)."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"job {job.job_id}: needs {num_blocks}, {len(self._free)} free")
        job.block_ids.extend(self._free.popleft() for _ in range(num_blocks))

    def free(self, job: Job) -> int:
        """Returns `job`'s blocks to the free list; returns how many."""
        num_freed = len(job.block_ids)
        self._free.extend(job.block_ids)
        job.block_ids = []
        return num_freed
