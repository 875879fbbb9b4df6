"""Cheap builders for the scheduler's pure core."""

from __future__ import annotations

from collections.abc import Callable

from services.scheduler.core import Decision, Event, Job, Policy, SchedulerConfig, SchedulerCore
from services.scheduler.core.policies import make_policy

STOP_TOKEN = 2


def property_settings(max_examples: int):
    """Hypothesis settings; FASTSERVE_HYPOTHESIS_EXAMPLES=N explores more (e.g. 2000)."""
    import os

    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=int(os.environ.get("FASTSERVE_HYPOTHESIS_EXAMPLES", max_examples)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def make_scheduler(policy: str | Policy = "fcfs", clock=None, **overrides) -> SchedulerCore:
    """A core with small defaults; `policy` is a name or a Policy."""
    values = dict(num_blocks=64, block_size=4, max_model_len=256, max_batch_size=4)
    values.update(overrides)
    config = SchedulerConfig(**values)
    if isinstance(policy, str):
        policy = make_policy(
            policy, max_model_len=config.max_model_len, max_batch_size=config.max_batch_size
        )
    if clock is None:
        return SchedulerCore(config, policy)
    return SchedulerCore(config, policy, clock=clock)


def make_jobs(n: int, prompt_len: int | Callable[[int], int] = 5, max_tokens: int = 4, **kw):
    jobs = []
    for i in range(n):
        length = prompt_len(i) if callable(prompt_len) else prompt_len
        prompt = [10 + (i * 7 + k) % 50 for k in range(length)]
        jobs.append(Job(job_id=f"j{i}", prompt_token_ids=prompt, max_tokens=max_tokens, **kw))
    return jobs


def fake_model(tokens: list[int | None]) -> int:
    """A deterministic 'model': the next token depends on every token so far, never STOP.
    A missing token (None: KV never written or lost) poisons the result."""
    if any(t is None for t in tokens):
        return 1
    return 3 + (sum((k + 1) * t for k, t in enumerate(tokens)) % 97)


def run_iteration(
    core: SchedulerCore, model=fake_model, between=None
) -> tuple[Decision, list[Event]]:
    """One iteration with a model that sees exactly the tokens the decision says are cached;
    `between` runs after the decision and before the update (e.g. to advance a clock)."""
    decision = core.schedule()
    if between is not None:
        between()
    sampled = {}
    for chunk in decision.chunks:
        if chunk.sample:
            job = core.job(chunk.job_id)
            assert job is not None
            history = job.token_slice(0, chunk.start_pos + len(chunk.token_ids))
            sampled[chunk.job_id] = model(history)
    return decision, core.update(decision, sampled)


def run_until_idle(core: SchedulerCore, max_iterations: int = 10_000, model=fake_model):
    """Runs iterations until no job is left; returns every (decision, events) pair."""
    history = []
    for _ in range(max_iterations):
        if not core.has_work():
            return history
        history.append(run_iteration(core, model))
    raise AssertionError("scheduler did not drain")


class SimWorker:
    """A worker made of dictionaries: a device pool of blocks holding token ids, a kvstore,
    and swaps that finish `swap_delay` iterations later (or fail at random). The fake model
    reads a job's history from its blocks, so any bookkeeping error in block tables, swaps or
    recompute changes the output. Like a real worker it holds each job's sampling settings from
    the chunk that brought them until the job is freed, and fails on a chunk without them."""

    def __init__(
        self, block_size: int, swap_delay: int = 1, fail_every: int = 0, wipe: bool = True
    ) -> None:
        """`wipe`: blocks swapped out lose their device content (stricter than a real worker,
        whose pool keeps it until overwritten; prefix caching relies on that)."""
        self.block_size = block_size
        self.wipe = wipe
        self.pool: dict[int, list[int | None]] = {}
        self.store: dict[str, list[list[int | None]]] = {}
        self.swap_delay = swap_delay
        self.fail_every = fail_every
        self._pending: list[tuple[int, object, bool]] = []  # (due iteration, result, is_in)
        self._num_swaps = 0
        self.iteration = 0
        self.sampling: dict[str, object] = {}  # job id -> its settings, as the worker holds them

    def _block(self, block_id: int) -> list[int | None]:
        return self.pool.setdefault(block_id, [None] * self.block_size)

    def _fails(self) -> bool:
        self._num_swaps += 1
        return bool(self.fail_every) and self._num_swaps % self.fail_every == 0

    def run(self, decision, model=fake_model):
        from services.scheduler.core import SwapResult

        self.iteration += 1
        for job_id in decision.free_job_ids:
            self.store.pop(job_id, None)
            self.sampling.pop(job_id, None)
        for move in decision.swap_out:  # copied off the device before the step
            copy = [list(self._block(b)) for b in move.block_ids]
            for b in move.block_ids if self.wipe else ():
                self.pool[b] = [None] * self.block_size  # the device copy is gone
            ok = not self._fails()
            if ok:
                self.store[move.job_id] = copy
            result = SwapResult(move.job_id, swap_in=False, ok=ok)
            self._pending.append((self.iteration + self.swap_delay, result, False))
        for move in decision.swap_in:
            data = self.store.get(move.job_id)
            ok = data is not None and len(data) == len(move.block_ids) and not self._fails()
            if ok:
                for b, content in zip(move.block_ids, data, strict=True):
                    self.pool[b] = list(content)
            result = SwapResult(move.job_id, swap_in=True, ok=ok)
            self._pending.append((self.iteration + self.swap_delay, result, True))
        sampled = {}
        for chunk in decision.chunks:
            if chunk.sampling is not None:
                self.sampling[chunk.job_id] = chunk.sampling
            assert chunk.job_id in self.sampling, f"{chunk.job_id}: sampling settings not sent"
            for offset, token in enumerate(chunk.token_ids):
                pos = chunk.start_pos + offset
                self._block(chunk.block_ids[pos // self.block_size])[pos % self.block_size] = token
            if chunk.sample:
                end = chunk.start_pos + len(chunk.token_ids)
                history = [
                    self._block(chunk.block_ids[p // self.block_size])[p % self.block_size]
                    for p in range(end)
                ]
                sampled[chunk.job_id] = model(history)
        done = [r for due, r, _ in self._pending if due <= self.iteration]
        self._pending = [p for p in self._pending if p[0] > self.iteration]
        return sampled, done
