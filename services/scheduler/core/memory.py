"""Where each job's KV lives, and what to do when device blocks run short.

KvMemory owns the device block pool's accounting and every job's KV state. Under pressure it
evicts jobs behind the one that needs room: with swapping on, the victim expected to run last
(largest ENST) first, its KV swapped to the kvstore when that is cheaper than recomputing it;
otherwise the lowest-priority job first, recomputed later (vLLM's behaviour). Proactively, it
keeps a reserve of free blocks for arrivals and prefetches the swapped-out jobs expected to run
soonest. Swaps run in the background on the worker; a job runs again only once its swap-in is
reported done, so a step never waits for a swap. A failed swap (kvstore full, gone, or missing
the blocks) makes the job recompute from its token ids: nothing is lost but time.
"""

from __future__ import annotations

from collections.abc import Callable

from services.scheduler.core.block_manager import BlockManager
from services.scheduler.core.config import SchedulerConfig
from services.scheduler.core.decision import BlockMove, SwapResult
from services.scheduler.core.host_cache import HostPrefixCache, is_host_job
from services.scheduler.core.job import Job, JobStatus, KvState
from services.scheduler.core.plan import Plan
from services.scheduler.core.priority import is_lower_class
from services.scheduler.core.stats import Counters
from services.scheduler.core.swap_cost import SwapCostModel


class KvMemory:
    def __init__(self, config: SchedulerConfig, costs: SwapCostModel, counters: Counters) -> None:
        self.config = config
        self.blocks = BlockManager(
            config.num_blocks,
            config.block_size,
            prefix_caching=config.prefix_caching,
            salt=config.prefix_cache_salt,
        )
        self.blocks.keep_evicted = config.host_cache
        self.host = HostPrefixCache(config.host_cache_blocks if config.host_cache else 0)
        self.costs = costs
        self.pending_free: list[str] = []  # jobs whose worker blocks / kvstore copy to release
        self.swaps_in_flight: set[str] = set()
        self.counters = counters

    @property
    def has_pending_free(self) -> bool:
        return bool(self.pending_free or self.host.to_delete)

    def take_pending_free(self) -> list[str]:
        pending, self.pending_free = self.pending_free, []
        return pending + self.host.take_deletes()

    def release(self, job: Job) -> None:
        """A finished or cancelled job: its device blocks and any kvstore copy go."""
        self.host.forget_job(job.job_id)
        if job.block_ids or job.kv_state is not KvState.NONE:
            self.blocks.free(job)
            self._free_on_workers(job)
        self.swaps_in_flight.discard(job.job_id)

    def recompute_all(self, jobs: list[Job]) -> None:
        """The worker lost its device KV, and with it the prefix cache; KV already in the
        kvstore stays usable, unless its job had left a shared prefix on the device."""
        lost = []
        for job in jobs:
            job.sampling_sent = False  # the workers were reset
            if job.kv_state not in (KvState.HOST, KvState.NONE):
                self.blocks.free(job)
                self.drop_kv(job)
            elif job.kv_state is KvState.HOST and job.num_shared_blocks:
                self.drop_kv(job)
                lost.append(job.job_id)  # the kvstore copy is of no use without the prefix
        self.swaps_in_flight.clear()
        self.pending_free = lost
        self.blocks.drop_cache()
        self.blocks.take_evicted()
        self.host.lost_workers()

    def make_room(self, job: Job, num_blocks: int, plan: Plan) -> bool:
        """Evicts jobs behind `job` in the order until `num_blocks` are free; False if it
        can't. With swapping, the victim expected to run last (largest ENST) goes first and
        its KV is swapped out when that is cheaper than recomputing it; otherwise the lowest
        priority goes first and is recomputed later (vLLM's behaviour)."""
        if num_blocks <= self.blocks.num_free_blocks:
            return True
        rank = plan.rank(job)
        # NOTE: a job with nothing computed yet (an arrival, or one already recomputed) takes
        # only free blocks or swapped-out ones, never dropped KV, unless it is starving or
        # nothing else can run. Under MLFQ every arrival outranks the jobs it demoted: if
        # arrivals could drop their KV, those would come back by starvation promotion and drop
        # others' in turn, and the policy would thrash
        # (docs/results/scheduling-smollm2.md, "Under memory pressure, in the simulator").
        # Jobs of a lower priority class are never spared: a class above always goes first.
        spare = plan.protect_progress and job.num_computed_tokens == 0 and not plan.is_starving(job)
        victims = [
            other
            for other in plan.order[rank + 1 :]
            if other.kv_state is KvState.DEVICE
            and other.block_ids
            and other.job_id not in plan.scheduled
            and not (spare and not is_lower_class(other, job) and self._would_recompute(other))
        ]
        if self.blocks.num_free_blocks + self.blocks.num_freed_by(victims) < num_blocks:
            return False  # evicting everyone behind it would not be enough: evict no one
        if self.config.swaps:
            victims.sort(key=lambda other: plan.enst(other))
        for victim in reversed(victims):
            if num_blocks <= self.blocks.num_free_blocks:
                break
            self.evict(victim, plan)
        return num_blocks <= self.blocks.num_free_blocks

    def _would_recompute(self, job: Job) -> bool:
        """Whether evicting `job` drops its KV rather than swapping it out."""
        return not (
            self.config.swaps
            and self.costs.prefer_swap(self._num_private_blocks(job), job.num_computed_tokens)
        )

    def _num_private_blocks(self, job: Job) -> int:
        return len(job.block_ids) - self.blocks.num_shared_blocks(job)

    def evict(self, job: Job, plan: Plan) -> None:
        """Drops `job`'s references. Swapped out, only the blocks nobody else holds move to
        the kvstore; its leading blocks shared with other jobs stay cached on the device, to be
        taken back by name (or, if they are gone by then, the job is recomputed)."""
        num_shared = self.blocks.num_shared_blocks(job)
        if num_shared < len(job.block_ids) and not self._would_recompute(job):
            moved = job.block_ids[num_shared:]
            plan.swap_out.append(BlockMove(job.job_id, moved))
            job.num_host_blocks = len(moved)
            job.num_shared_blocks = num_shared
            self.blocks.free(job)
            job.kv_state = KvState.SWAPPING_OUT
            job.num_swaps += 1
            self.counters.num_swapped_out_jobs += 1
            self.swaps_in_flight.add(job.job_id)
        else:
            self.preempt_by_recompute(job)

    def swap_in_if_room(self, job: Job, plan: Plan) -> bool:
        if plan.short_of_blocks or job.job_id in plan.swapping_in:
            return False
        prefix = self._shared_prefix(job)
        if prefix is None:
            return False
        if not self.make_room(job, self._num_to_restore(job, prefix), plan):
            return False
        self._start_swap_in(job, prefix, plan)
        plan.swapping_in.add(job.job_id)
        return True

    def _shared_prefix(self, job: Job) -> list[int] | None:
        """The cached blocks a swapped-out job left on the device; None, and the job is
        recomputed, when some are gone."""
        names = job.block_hashes[: job.num_shared_blocks]
        found = self.blocks.find(names)
        if len(found) == len(names):
            return found
        self._free_on_workers(job)  # the kvstore copy is of no use without the prefix
        self.drop_kv(job)
        return None

    def _num_to_restore(self, job: Job, prefix: list[int]) -> int:
        """Free blocks a swap-in uses up: its own, and the cached prefix nobody holds now."""
        return job.num_host_blocks + self.blocks.num_evictable(prefix)

    def _start_swap_in(self, job: Job, prefix: list[int], plan: Plan) -> None:
        self.blocks.share(job, prefix)
        self.blocks.allocate_blocks(job, job.num_host_blocks)
        job.num_shared_blocks = 0
        job.kv_state = KvState.SWAPPING_IN
        plan.swap_in.append(BlockMove(job.job_id, job.block_ids[len(prefix) :]))
        self.swaps_in_flight.add(job.job_id)

    def keep_reserve(self, plan: Plan) -> None:
        """Proactive swap-out: keep `reserve_blocks` free for arrivals, taking blocks from the
        resident jobs that are expected to wait longest."""
        if self.blocks.num_free_blocks >= self.config.reserve_blocks:
            return
        # The jobs at the head of the order run next: evicting them would only thrash.
        protected = {job.job_id for job in plan.order[: self.config.max_batch_size]}
        idle = [
            job
            for job in plan.order
            if job.kv_state is KvState.DEVICE
            and job.block_ids
            and job.job_id not in plan.scheduled
            and job.job_id not in protected
        ]
        idle.sort(key=lambda job: plan.enst(job), reverse=True)
        for job in idle:
            if self.blocks.num_free_blocks >= self.config.reserve_blocks:
                break
            self.evict(job, plan)

    def prefetch(self, plan: Plan) -> None:
        """Proactive swap-in: bring back the swapped-out jobs expected to run soonest, and the
        prefixes in the kvstore of waiting jobs that have not started, while the free blocks
        stay above the reserve."""
        if plan.short_of_blocks:
            return
        waiting = [
            job
            for job in plan.order
            if job.kv_state is KvState.HOST
            or (self.host.num_stored and job.kv_state is KvState.NONE and not job.block_ids)
        ]
        waiting.sort(key=lambda job: plan.enst(job))
        # Hysteresis: leave room for the running jobs' next blocks on top of the reserve, or
        # the next iteration's growth pushes free blocks under the reserve and keep_reserve
        # swaps straight back out what was just prefetched.
        headroom = self.config.reserve_blocks + len(plan.chunks)
        for job in waiting:
            if job.kv_state is KvState.NONE:
                cached = self.blocks.cached_prefix(job)
                names = self.host_prefix(job, len(cached))
                if not names:
                    continue
                need = len(names) + self.blocks.num_evictable(cached)
                if self.blocks.num_free_blocks - need < headroom:
                    break
                self.load_prefix(job, cached, names, plan)
                continue
            prefix = self._shared_prefix(job)
            if prefix is None:
                continue  # recomputed instead
            if self.blocks.num_free_blocks - self._num_to_restore(job, prefix) < headroom:
                break
            self._start_swap_in(job, prefix, plan)

    def apply_swap_result(self, result: SwapResult, job_of: Callable[[str], Job | None]) -> None:
        """A swap the workers finished; `job_of` finds a job by id."""
        self.swaps_in_flight.discard(result.job_id)
        if result.ok:
            self.costs.observe(result.num_bytes, result.duration_s)
        if is_host_job(result.job_id):
            self._apply_host_result(result, job_of)
            return
        job = job_of(result.job_id)
        if job is None:
            return  # finished or cancelled meanwhile; the worker already dropped its copy
        expected = KvState.SWAPPING_IN if result.swap_in else KvState.SWAPPING_OUT
        if job.kv_state is not expected:
            return
        if not result.ok:  # the kvstore is full, gone, or lost the blocks: recompute
            self.counters.num_swap_failures += 1
            if result.swap_in:
                self.blocks.free(job)
                self._free_on_workers(job)
            self.drop_kv(job)
        elif result.swap_in:
            job.kv_state = KvState.DEVICE
            self.counters.num_swapped_in_jobs += 1
        else:
            job.kv_state = KvState.HOST

    # -- the prefix cache's host tier ---------------------------------------------------------

    def count_prefix(self, job: Job, num_device_blocks: int, num_host_blocks: int = 0) -> None:
        """A job starting from nothing looked its prefix up. (Host hits count once the blocks
        have landed: a load that fails is no hit.)"""
        size = self.config.block_size
        self.counters.num_prefix_query_tokens += job.num_tokens
        self.counters.num_prefix_hit_tokens += num_device_blocks * size
        if job.status is JobStatus.WAITING:  # what its usage reports: its first prefill
            job.num_cached_tokens = (num_device_blocks + num_host_blocks) * size

    def spill_evicted(self, plan: Plan) -> None:
        """Cached blocks handed out for other content this iteration go to the kvstore first:
        the workers copy swap-outs off before the step (or a swap-in) writes the blocks."""
        for name, block_id in self.blocks.take_evicted():
            move = self.host.spill(name, block_id)
            if move is not None:
                plan.swap_out.append(move)
                self.swaps_in_flight.add(move.job_id)

    def host_prefix(self, job: Job, num_device_blocks: int) -> list[bytes]:
        """Names of the job's blocks after its `num_device_blocks` cached on the device that the
        kvstore holds, when reading them back is cheaper than computing them."""
        if not self.host.num_stored or job.block_ids or job.num_computed_tokens:
            return []
        limit = (job.num_tokens - 1) // self.config.block_size
        names = self.host.find(self.blocks.block_hashes(job, limit)[num_device_blocks:])
        if not names:
            return []
        # One way of a swap (the model's cost is for out and back in), against computing them.
        read_s = self.costs.swap_cost(len(names)) / 2
        if read_s >= self.costs.recompute_cost(len(names) * self.config.block_size):
            return []
        return names

    def load_prefix(self, job: Job, prefix: list[int], names: list[bytes], plan: Plan) -> None:
        """The job starts with its device-cached `prefix`, then blocks read back from the
        kvstore (room for them is made already); it runs once they have all landed."""
        self.count_prefix(job, len(prefix), len(names))
        self.blocks.share(job, prefix)
        self.blocks.allocate_blocks(job, len(names))
        targets = job.block_ids[len(prefix) :]
        host_ids = self.host.start_load(job.job_id, names)
        for host_id, block_id in zip(host_ids, targets, strict=True):
            plan.swap_in.append(BlockMove(host_id, [block_id]))
            self.swaps_in_flight.add(host_id)
        job.num_computed_tokens = len(job.block_ids) * self.config.block_size
        job.kv_state = KvState.SWAPPING_IN

    def _apply_host_result(self, result: SwapResult, job_of: Callable[[str], Job | None]) -> None:
        if not result.swap_in:
            self.host.spill_done(result.job_id, result.ok)
            return
        waiter = self.host.waiter(result.job_id)
        job = job_of(waiter) if waiter is not None else None
        if not result.ok:  # the kvstore lost it, or was restarted: the job computes it instead
            if waiter is not None:
                self.counters.num_swap_failures += 1
                self.host.forget_job(waiter)  # its other loads are freed (after they finish)
            if job is not None and job.kv_state is KvState.SWAPPING_IN:
                self.preempt_by_recompute(job)
            return
        if self.host.load_done(result.job_id) and job is not None:
            job.kv_state = KvState.DEVICE
            num_loaded = len(job.block_ids) - job.num_registered_blocks  # after its prefix
            self.counters.num_prefix_host_hit_tokens += num_loaded * self.config.block_size
            self.blocks.register(job)  # the loaded blocks are named on the device again

    def preempt_by_recompute(self, job: Job) -> None:
        self.blocks.free(job)
        self._free_on_workers(job)
        self.drop_kv(job)

    def _free_on_workers(self, job: Job) -> None:
        """The next decision tells the workers to forget the job: its blocks, any kvstore copy
        and its sampling settings (sent again with its next chunk)."""
        self.pending_free.append(job.job_id)
        job.sampling_sent = False

    def drop_kv(self, job: Job) -> None:
        job.num_computed_tokens = 0
        job.num_host_blocks = 0
        job.num_shared_blocks = 0
        job.kv_state = KvState.NONE
        job.num_preemptions += 1
        self.counters.num_recomputed_jobs += 1
