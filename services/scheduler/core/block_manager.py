"""KV block accounting, with automatic prefix caching. The scheduler hands out block ids; every
stage uses the same ids for a job, so a plan is exact and workers never decide anything.

A full block is named by a hash chain over its tokens (and everything before them, and a salt
naming the model and stage layout), so two jobs whose token ids agree up to a block boundary
can share the blocks before it. Blocks carry reference counts. A block no job references stays
cached (evictable) while its content is still valid, and is reused least recently released
first, only when no never-used block is left. A job's last, partial block is always its own,
and a job writes only blocks nobody else references: shared blocks are full and read-only.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence

from services.scheduler.core.job import Job


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def chain_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The name of a full block: its tokens, after the block named `parent`."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    """Free and cached device block ids; a job's block table grows as its tokens are computed
    and may start with blocks it shares with other jobs."""

    def __init__(
        self, num_blocks: int, block_size: int, *, prefix_caching: bool = False, salt: str = ""
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._root = hashlib.blake2b(salt.encode(), digest_size=16).digest()
        self._free: deque[int] = deque(range(num_blocks))  # never used, or content dropped
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # cached block -> its name
        self._block_of: dict[bytes, int] = {}  # name -> cached block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        # Cached blocks reused for other content since the last take_evicted(), with their
        # names, when someone wants them (the host tier): kept only when keep_evicted is set.
        self.keep_evicted = False
        self._evicted: list[tuple[bytes, int]] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks a job can get now: never used, or cached with no reference."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose content is named in the cache (referenced or not)."""
        return len(self._hash_of)

    def refs(self, block_id: int) -> int:
        return self._refs[block_id]

    # -- allocation ------------------------------------------------------------------------

    def num_new_blocks(self, job: Job, num_new_tokens: int) -> int:
        """Blocks `job` must gain to hold `num_new_tokens` more computed tokens."""
        needed = num_blocks_for(job.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, needed - len(job.block_ids))

    def can_allocate(self, job: Job, num_new_tokens: int) -> bool:
        return self.num_new_blocks(job, num_new_tokens) <= self.num_free_blocks

    def allocate(self, job: Job, num_new_tokens: int) -> None:
        self.allocate_blocks(job, self.num_new_blocks(job, num_new_tokens))

    def allocate_blocks(self, job: Job, num_blocks: int) -> None:
        """Gives a job `num_blocks` blocks of its own (for new tokens, or to swap its KV into)."""
        if num_blocks > self.num_free_blocks:
            raise RuntimeError(
                f"job {job.job_id}: needs {num_blocks} blocks, {self.num_free_blocks} free"
            )
        for _ in range(num_blocks):
            block_id = self._take()
            self._refs[block_id] = 1
            job.block_ids.append(block_id)

    def free(self, job: Job) -> int:
        """Drops `job`'s references; returns how many blocks it held."""
        num_held = len(job.block_ids)
        for block_id in job.block_ids:
            self._release(block_id)
        job.block_ids = []
        job.num_registered_blocks = 0
        return num_held

    def num_freed_by(self, jobs: Iterable[Job]) -> int:
        """Blocks that would become free if all of `jobs` dropped their references (a block
        they share counts once, and only if nobody else holds it)."""
        held = Counter(block_id for job in jobs for block_id in job.block_ids)
        return sum(1 for block_id, count in held.items() if count == self._refs[block_id])

    def num_shared_blocks(self, job: Job) -> int:
        """The leading blocks of `job`'s table that other jobs reference too (shared blocks
        always form a prefix: they were found by walking a hash chain from the start)."""
        count = 0
        for block_id in job.block_ids:
            if self._refs[block_id] < 2:
                break
            count += 1
        return count

    # -- the prefix cache ------------------------------------------------------------------

    def block_hashes(self, job: Job, num_blocks: int) -> list[bytes]:
        """Names of the job's first `num_blocks` full blocks (computed once per job)."""
        hashes = job.block_hashes
        size = self.block_size
        while len(hashes) < num_blocks:
            index = len(hashes)
            parent = hashes[-1] if hashes else self._root
            hashes.append(chain_hash(parent, job.token_slice(index * size, (index + 1) * size)))
        return hashes[:num_blocks]

    def cached_prefix(self, job: Job) -> list[int]:
        """Cached blocks holding the job's leading full blocks. At least its last token is left
        to compute (its logits give the next token)."""
        if not self.prefix_caching or job.block_ids:
            return []
        return self.find(self.block_hashes(job, (job.num_tokens - 1) // self.block_size))

    def find(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks named by `hashes`, up to the first one not cached."""
        found = []
        for name in hashes:
            block_id = self._block_of.get(name)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def num_evictable(self, block_ids: Iterable[int]) -> int:
        """How many of these cached blocks nobody references (taking them uses up free ones)."""
        return sum(1 for block_id in block_ids if self._refs[block_id] == 0)

    def share(self, job: Job, block_ids: Sequence[int]) -> None:
        """Puts cached blocks at the start of `job`'s (empty) table."""
        assert not job.block_ids, f"job {job.job_id} already has blocks"
        for block_id in block_ids:
            if self._refs[block_id] == 0:
                del self._evictable[block_id]
            self._refs[block_id] += 1
        job.block_ids = list(block_ids)
        job.num_registered_blocks = len(block_ids)

    def register(self, job: Job) -> None:
        """Names the job's full computed blocks in the cache, so later jobs can share them."""
        if not self.prefix_caching:
            return
        num_full = min(job.num_computed_tokens // self.block_size, len(job.block_ids))
        if num_full <= job.num_registered_blocks:
            return
        hashes = self.block_hashes(job, num_full)
        for index in range(job.num_registered_blocks, num_full):
            block_id, name = job.block_ids[index], hashes[index]
            if name not in self._block_of and block_id not in self._hash_of:
                self._block_of[name] = block_id
                self._hash_of[block_id] = name
        job.num_registered_blocks = num_full

    def drop_cache(self) -> None:
        """Forgets every cached block's content (the workers lost their KV). Referenced blocks
        stay allocated to their jobs but are no longer shared by name."""
        for block_id in self._evictable:
            self._free.append(block_id)
        self._evictable.clear()
        self._block_of.clear()
        self._hash_of.clear()

    # -- internals -------------------------------------------------------------------------

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        block_id, _ = self._evictable.popitem(last=False)  # least recently released
        name = self._hash_of.pop(block_id)
        del self._block_of[name]
        if self.keep_evicted:
            self._evicted.append((name, block_id))
        return block_id

    def take_evicted(self) -> list[tuple[bytes, int]]:
        """(name, block) of the cached blocks handed out for other content since last asked:
        their old content is still there until the next step writes them."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def _release(self, block_id: int) -> None:
        refs = self._refs[block_id] - 1
        if refs < 0:
            raise RuntimeError(f"block {block_id} released more often than taken")
        self._refs[block_id] = refs
        if refs:
            return
        if block_id in self._hash_of:
            self._evictable[block_id] = None  # cached: its content may serve a later job
        else:
            self._free.append(block_id)
