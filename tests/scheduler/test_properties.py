"""Properties of the scheduling core under random workloads (hypothesis), on a simulated clock.

Each example admits jobs over time, runs iterations of a fixed simulated length with a
deterministic fake model, and checks invariants at every iteration and at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.core import EventKind, Job
from services.scheduler.core.mlfq import MlfqOptions, MlfqPolicy
from services.scheduler.core.profile import SYNTHETIC_PROFILE

from .factories import make_scheduler, property_settings, run_iteration
from .test_core import outputs_of, reference_output

ITERATION_S = 0.01
SETTINGS = property_settings(60)


@dataclass(frozen=True)
class Arrival:
    iteration: int
    prompt_len: int
    max_tokens: int


arrivals = st.lists(
    st.builds(
        Arrival,
        iteration=st.integers(0, 40),
        prompt_len=st.integers(1, 40),
        max_tokens=st.integers(1, 30),
    ),
    min_size=1,
    max_size=14,
)


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += ITERATION_S


def make_policy(kind: str, starvation_s: float = 0.2, **overrides) -> MlfqPolicy:
    options = MlfqOptions(
        base_quantum_s=0.02,
        num_queues=5,
        starvation_s=starvation_s,
        skip_join=kind != "mlfq",
        **overrides,
    )
    return MlfqPolicy(options, SYNTHETIC_PROFILE, kind)


def simulate(workload: list[Arrival], core, clock: SimClock, observe=None):
    jobs = {}
    pending = sorted(enumerate(workload), key=lambda item: item[1].iteration)
    history = []
    iteration = 0
    while pending or core.has_work():
        while pending and pending[0][1].iteration <= iteration:
            index, arrival = pending.pop(0)
            job = Job(
                f"j{index}", [10 + (index + k) % 50 for k in range(arrival.prompt_len)],
                arrival.max_tokens,
            )  # fmt: skip
            jobs[job.job_id] = job
            history.append((None, core.add_job(job)))
        if observe is not None:
            observe(core, clock.now)
        history.append(run_iteration(core, between=clock.tick))
        iteration += 1
        assert iteration < 5000, "did not drain"
    return jobs, history


@SETTINGS
@given(
    workload=arrivals,
    policy=st.sampled_from(["skip-join-mlfq", "mlfq", "fcfs", "srpt-oracle"]),
    num_blocks=st.integers(12, 60),
)
def test_no_job_is_lost_or_duplicated_and_outputs_are_exact(workload, policy, num_blocks):
    clock = SimClock()
    core = make_scheduler(
        num_blocks=num_blocks, block_size=4, max_batch_size=3, max_batched_tokens=24,
        policy=make_policy(policy) if "mlfq" in policy else policy, clock=clock,
    )  # fmt: skip
    jobs, history = simulate(workload, core, clock)
    finished = [e.job_id for _, events in history for e in events if e.kind is EventKind.FINISHED]
    rejected = {e.job_id for _, events in history for e in events if e.kind is EventKind.REJECTED}
    assert sorted(finished) == sorted(set(jobs) - rejected)  # each admitted job finishes once
    outputs = outputs_of([h for h in history if h[0] is not None])
    for job_id in finished:
        assert outputs[job_id] == reference_output(jobs[job_id])  # recompute loses nothing
    for decision, _ in history:
        if decision is not None:
            ids = [c.job_id for c in decision.chunks]
            assert len(ids) == len(set(ids)) <= 3
            assert decision.num_tokens <= 24
    assert core.blocks.num_free_blocks == num_blocks


@SETTINGS
@given(workload=arrivals, backfill=st.booleans(), num_blocks=st.integers(10, 40))
def test_a_higher_priority_job_is_passed_over_only_when_blocked(workload, backfill, num_blocks):
    """Backfill rule: a job may run ahead of one before it in the policy's order only when that
    one could not get KV blocks even after evicting every job behind it."""
    clock = SimClock()
    core = make_scheduler(
        num_blocks=num_blocks, block_size=4, max_batch_size=3, max_batched_tokens=200,
        policy=make_policy("skip-join-mlfq"), backfill=backfill, clock=clock,
    )  # fmt: skip
    pairs = []  # the policy's order just before each decision (order() is idempotent)

    def observe(c, now):
        pairs.append([job.job_id for job in c.policy.order(now)])

    _, history = simulate(workload, core, clock, observe=observe)
    decisions = [d for d, _ in history if d is not None]
    assert len(decisions) == len(pairs)
    for order, decision in zip(pairs, decisions, strict=True):
        scheduled = {c.job_id for c in decision.chunks}
        if not scheduled:
            continue
        last = max(order.index(job_id) for job_id in scheduled)
        passed_over = [j for j in order[:last] if j not in scheduled]
        assert set(passed_over) <= set(decision.blocked_job_ids), (order, decision)
        if not backfill:
            assert not passed_over


@SETTINGS
@given(prompt_len=st.integers(1, 2048), base=st.floats(0.001, 0.05), ratio=st.floats(1.1, 4))
def test_skip_join_level_matches_the_quantum_formula(prompt_len, base, ratio):
    policy = MlfqPolicy(
        MlfqOptions(base_quantum_s=base, quantum_ratio=ratio, num_queues=8),
        SYNTHETIC_PROFILE,
        "skip-join-mlfq",
    )
    level = policy.add(Job("j", list(range(prompt_len)), 1), 0.0)
    prefill = SYNTHETIC_PROFILE.prefill_time(prompt_len)
    fits = [k for k in range(8) if base * ratio**k >= prefill]
    assert level == (fits[0] if fits else 7)


@SETTINGS
@given(charges=st.lists(st.floats(0.0001, 0.2), min_size=1, max_size=40))
def test_demotion_happens_exactly_when_attained_service_passes_the_quantum(charges):
    policy = MlfqPolicy(
        MlfqOptions(base_quantum_s=0.02, num_queues=6, charge="whole", starvation="off"),
        SYNTHETIC_PROFILE,
        "mlfq",
    )
    job = Job("j", [1], 10_000)
    policy.add(job, 0.0)
    quanta = policy.quanta
    total = 0.0
    for i, charge in enumerate(charges):
        policy.on_iteration([(job, 1)], charge, float(i))
        total += charge
        # Level k is left once service passes q0 + ... + qk (carried over between queues).
        # Within float rounding of a boundary either side is right.
        boundaries = [sum(quanta[: k + 1]) for k in range(len(quanta) - 1)]
        surely = sum(1 for b in boundaries if total > b + 1e-9)
        maybe = sum(1 for b in boundaries if total > b - 1e-9)
        assert surely <= policy.level(job) <= maybe


@SETTINGS
@given(workload=arrivals)
def test_with_promotion_no_job_waits_past_the_threshold_plus_one_iteration(workload):
    """Starving jobs go first, longest wait first, so with at most max_batch_size of them at once
    no job waits longer than the threshold plus one iteration. With more, they take turns: the
    bound is the threshold plus ceil(starving / max_batch_size) iterations."""
    threshold = 0.1
    clock = SimClock()
    batch = 3
    core = make_scheduler(
        num_blocks=400, block_size=4, max_batch_size=batch,
        max_batched_tokens=batch * 40, policy=make_policy("skip-join-mlfq", threshold),
        clock=clock,
    )  # fmt: skip
    last_ran: dict[str, float] = {}
    worst: dict[str, float] = {}
    max_starving = [0]

    def observe(c, now):
        starving = [j for j in c.policy.order(now) if c.policy.waited(j, now) > threshold]
        max_starving[0] = max(max_starving[0], len(starving))

    _, history = simulate(workload, core, clock, observe=observe)
    now = 0.0
    for decision, events in history:
        if decision is None:
            for event in events:
                if event.kind is EventKind.QUEUED:
                    last_ran[event.job_id] = now
            continue
        for chunk in decision.chunks:
            wait = now - last_ran[chunk.job_id]
            worst[chunk.job_id] = max(worst.get(chunk.job_id, 0.0), wait)
        now += ITERATION_S
        for chunk in decision.chunks:
            last_ran[chunk.job_id] = now
    bound = threshold + ITERATION_S * math.ceil(max(max_starving[0], 1) / batch)
    assert max(worst.values(), default=0.0) <= bound + 1e-9
    if max_starving[0] <= batch:
        assert max(worst.values(), default=0.0) <= threshold + ITERATION_S + 1e-9
