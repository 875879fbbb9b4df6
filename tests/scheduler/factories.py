"""Cheap builders for the scheduler's pure core (STYLE 9)."""

from __future__ import annotations

from collections.abc import Callable

from services.scheduler.core import Decision, Event, Job, SchedulerConfig, SchedulerCore

STOP_TOKEN = 2


def make_scheduler(**overrides) -> SchedulerCore:
    values = dict(num_blocks=64, block_size=4, max_model_len=256, max_batch_size=4)
    values.update(overrides)
    policy = values.pop("policy_obj", None)
    clock = values.pop("clock", None)
    config = SchedulerConfig(**values)
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


def fake_model(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends on every token so far, never STOP."""
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
