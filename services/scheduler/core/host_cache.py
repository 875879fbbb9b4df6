"""The prefix cache's host tier: cached blocks evicted from the device pool go to the kvstore
under their name instead of being thrown away, and come back for a job whose prefix is there
when copying them is cheaper than computing them again.

A block in the kvstore is stored as a one-block "job" named `prefix:<name>` (the kvstore and
the workers' swapper need nothing new: a spill is a swap-out of that job, a load a swap-in, and
freeing the job deletes the copy). This module only keeps the index: which names are in the
kvstore (least recently used first, bounded by `capacity_blocks`), which spills are still on
their way, and which loads each waiting job is waiting for. A spill or load that fails (the
kvstore is full, gone or restarted) only removes the name: the job computes the block instead.
"""

from __future__ import annotations

from collections import OrderedDict

from services.scheduler.core.decision import BlockMove

PREFIX = "prefix:"


def host_job_id(name: bytes) -> str:
    return PREFIX + name.hex()


def is_host_job(job_id: str) -> bool:
    return job_id.startswith(PREFIX)


class HostPrefixCache:
    def __init__(self, capacity_blocks: int) -> None:
        self.capacity_blocks = capacity_blocks
        self._stored: OrderedDict[bytes, None] = OrderedDict()  # in the kvstore; LRU first
        self._spilling: dict[bytes, None] = {}  # on their way there
        self._loading: dict[str, set[str]] = {}  # job id -> host job ids it waits for
        self._waiter: dict[str, str] = {}  # host job id -> the job it is loaded for
        self.to_delete: list[str] = []  # host jobs the workers must free (kvstore copies)

    @property
    def enabled(self) -> bool:
        return self.capacity_blocks > 0

    @property
    def num_stored(self) -> int:
        """Blocks in the kvstore now, that a job can load."""
        return len(self._stored)

    @property
    def num_blocks(self) -> int:
        return len(self._stored) + len(self._spilling)

    def spill(self, name: bytes, block_id: int) -> BlockMove | None:
        """A cached block leaving the device: the swap-out that keeps it, if it is not kept
        already."""
        if name in self._stored or name in self._spilling:
            return None
        if host_job_id(name) in self._waiter:
            return None  # being loaded: that load's end frees the name's copy
        if len(self._spilling) >= self.capacity_blocks:
            return None  # full of spills still on their way
        while self.num_blocks >= self.capacity_blocks:
            oldest, _ = self._stored.popitem(last=False)
            self.to_delete.append(host_job_id(oldest))
        self._spilling[name] = None
        return BlockMove(host_job_id(name), [block_id])

    def find(self, names: list[bytes]) -> list[bytes]:
        """The leading names of `names` stored in the kvstore (spills confirmed)."""
        found = []
        for name in names:
            if name not in self._stored:
                break
            found.append(name)
        return found

    def start_load(self, job_id: str, names: list[bytes]) -> list[str]:
        """`job_id` waits for these names to be read back; returns their host job ids. A
        loaded block lives on the device again, so its kvstore copy goes."""
        host_ids = [host_job_id(name) for name in names]
        self._loading[job_id] = set(host_ids)
        for name, host_id in zip(names, host_ids, strict=True):
            del self._stored[name]
            self._waiter[host_id] = job_id
        return host_ids

    def waiter(self, host_id: str) -> str | None:
        """The job a load in flight is for (None once that job was forgotten)."""
        return self._waiter.get(host_id)

    def spill_done(self, host_id: str, ok: bool) -> None:
        name = bytes.fromhex(host_id[len(PREFIX) :])
        was_spilling = name in self._spilling
        self._spilling.pop(name, None)
        if not ok:
            self.to_delete.append(host_id)  # whatever part of it arrived
        elif was_spilling:
            self._stored[name] = None

    def load_done(self, host_id: str) -> bool:
        """A load landed: True when its job now has all it waited for. The load is freed on
        the workers (that ends its hold on the block; the kvstore copy is gone already)."""
        job_id = self._waiter.pop(host_id, None)
        if job_id is None:
            return False  # its job was forgotten, and the load freed, already
        self.to_delete.append(host_id)
        waiting = self._loading[job_id]
        waiting.discard(host_id)
        if waiting:
            return False
        del self._loading[job_id]
        return True

    def forget_job(self, job_id: str) -> None:
        """The job no longer waits (it failed a load, finished or was recomputed): its loads
        still in flight are freed on the workers, which first waits for them to finish
        writing, so the blocks they write can go to another job."""
        for host_id in self._loading.pop(job_id, ()):
            del self._waiter[host_id]
            self.to_delete.append(host_id)

    def lost_workers(self) -> None:
        """The workers were reset: swaps in flight will never report, and a restarted worker
        no longer knows where its copies are. Everything is forgotten (and freed, for a worker
        that survived)."""
        self.to_delete.extend(host_job_id(name) for name in self._stored)
        self.to_delete.extend(self._waiter)
        self._stored.clear()
        self._spilling.clear()
        self._loading.clear()
        self._waiter.clear()

    def take_deletes(self) -> list[str]:
        deletes, self.to_delete = self.to_delete, []
        return deletes
