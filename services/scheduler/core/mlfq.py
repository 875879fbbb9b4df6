"""Skip-join multi-level feedback queue (FastServe, Wu et al., arXiv 2305.05920, section 4).

What the paper does: queues Q0 (highest) .. Qn-1 with quanta q_k = q0 * r^k. A new job joins
the highest queue whose quantum covers its profiled prefill time (skip-join), so long prompts do
not first demote their way down through every queue. Every iteration the batch is re-formed from
the queues, highest first and FIFO inside a queue, so a new short job preempts a running long
one at the next token. Attained service in Qk beyond q_k demotes a job to Qk+1. A job that
waited longer than a threshold is promoted to Q0 to avoid starvation.

Where we differ, and why (each difference is an option, so the benchmark can show its effect):
- charge="share" (default): each job in a batch is charged its own share of the iteration,
  estimated from the profile (a decode shares its iteration with the batch; a prefill chunk
  costs its own prefill time) and scaled so the shares add up to the measured iteration time.
  The paper's code charges every job the whole iteration ("whole"), so a short job batched with
  a long prefill is demoted as if it had done that prefill itself.
- starvation="credit" (default): a starving job goes ahead of everything, longest wait first,
  and is promoted to Q0 with the allowance of the queue it came from, so a long prompt that
  finally runs finishes its prefill instead of being demoted again after one iteration and
  starving anew (why long prompts dominate the paper's P95). "paper" moves it to the tail of
  Q0 with Q0's quantum.
- Demotion carries attained service over, so a job may drop several queues in one iteration
  when it overran several quanta at once (the paper demotes one queue at a time).
- Backfill (lower-priority jobs fill a batch when a higher one cannot get KV blocks) lives in
  SchedulerCore, since it concerns batch formation, not the queues.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.scheduler.core.job import Job
from services.scheduler.core.policy import Policy
from services.scheduler.core.profile import PerformanceProfile

CHARGE_MODES = ("share", "whole")
STARVATION_MODES = ("credit", "paper", "off")

# Default starvation threshold, in full-batch decode iterations: well above a demoted job's
# normal wait under load (see MlfqOptions.from_profile); how 1000 was chosen:
# docs/results/scheduling-smollm2.md, "The starvation threshold".
STARVATION_ITERATIONS = 1000


@dataclass(frozen=True, slots=True)
class MlfqOptions:
    base_quantum_s: float  # q0
    quantum_ratio: float = 2.0  # r
    num_queues: int = 8
    starvation_s: float = 3.0  # a job that waited this long is promoted
    skip_join: bool = True  # False: every job joins Q0 (plain MLFQ)
    charge: str = "share"
    starvation: str = "credit"

    def __post_init__(self) -> None:
        if self.base_quantum_s <= 0 or self.quantum_ratio < 1 or self.num_queues < 1:
            raise ValueError("need base_quantum_s > 0, quantum_ratio >= 1, num_queues >= 1")
        if self.starvation_s <= 0:
            raise ValueError("starvation_s must be > 0")
        if self.charge not in CHARGE_MODES:
            raise ValueError(f"charge must be one of {CHARGE_MODES}")
        if self.starvation not in STARVATION_MODES:
            raise ValueError(f"starvation must be one of {STARVATION_MODES}")

    @property
    def quanta(self) -> list[float]:
        return [self.base_quantum_s * self.quantum_ratio**k for k in range(self.num_queues)]

    @classmethod
    def from_profile(
        cls,
        profile: PerformanceProfile,
        max_model_len: int,
        max_batch_size: int,
        **overrides: Any,
    ) -> MlfqOptions:
        """Defaults derived from the engine's speed: q0 is one lone decode iteration; enough
        queues that the last quantum covers the longest possible job run alone (a full-context
        prefill, then decoding to the end of the context), at most 16; the starvation
        threshold is STARVATION_ITERATIONS full-batch decode iterations, at least 0.5 s.

        Why the longest job and not the longest prefill: the last queue is FIFO, so once jobs
        sink to it the policy is FCFS among them. Sized for prefills only, the tiny test model
        would get 4 queues spanning 2-19 ms: a 4-token job would sink to the last queue behind
        a 250-token one after 3 tokens and wait for all of it.

        Why the threshold is long: it must stay well above the normal wait of a demoted job
        under load, or promotion turns the policy back into FCFS by waiting time. Once jobs
        arrive faster than they finish, every demoted job eventually waits past any threshold;
        promoted first (longest wait first, with their old queue's allowance), they then hold
        the batch against every arrival."""
        q0 = float(overrides.pop("base_quantum_s", profile.decode_time(1)))
        ratio = float(overrides.pop("quantum_ratio", 2.0))
        longest = profile.prefill_time(max_model_len) + max_model_len * profile.decode_time(1)
        needed = 1 + math.ceil(math.log(max(longest / q0, 1.0), max(ratio, 1.0001)))
        num_queues = int(overrides.pop("num_queues", min(needed, 16)))
        starvation = overrides.pop(
            "starvation_s", max(STARVATION_ITERATIONS * profile.decode_time(max_batch_size), 0.5)
        )
        return cls(
            base_quantum_s=q0,
            quantum_ratio=ratio,
            num_queues=num_queues,
            starvation_s=float(starvation),
            **overrides,
        )


class MlfqPolicy(Policy):
    def __init__(
        self, options: MlfqOptions, profile: PerformanceProfile, name: str, batch_size: int = 16
    ) -> None:
        self.name = name
        self.batch_size = batch_size
        self.options = options
        self.quanta = options.quanta
        self._profile = profile
        self._queues: list[dict[str, Job]] = [{} for _ in self.quanta]  # FIFO by insertion
        self._level: dict[str, int] = {}
        self._attained: dict[str, float] = {}  # service since joining the current queue
        self._allowance: dict[str, float] = {}  # service allowed before demotion
        self._waiting_since: dict[str, float] = {}  # arrival or last run

    def join_level(self, num_prompt_tokens: int) -> int:
        """Skip-join: the highest queue whose quantum covers the profiled prefill time."""
        if not self.options.skip_join:
            return 0
        prefill = self._profile.prefill_time(num_prompt_tokens)
        return next((k for k, q in enumerate(self.quanta) if q >= prefill), len(self.quanta) - 1)

    def add(self, job: Job, now: float) -> int:
        level = self.join_level(job.num_uncached_prompt_tokens)
        self._move(job, level, allowance=self.quanta[level])
        self._waiting_since[job.job_id] = now
        return level

    def remove(self, job: Job) -> None:
        level = self._level.pop(job.job_id, None)
        if level is not None:
            self._queues[level].pop(job.job_id, None)
        for table in (self._attained, self._allowance, self._waiting_since):
            table.pop(job.job_id, None)

    @property
    def num_levels(self) -> int:
        return len(self.quanta)

    def level(self, job: Job) -> int:
        return self._level[job.job_id]

    def waited(self, job: Job, now: float) -> float:
        return now - self._waiting_since[job.job_id]

    def is_starving(self, job: Job, now: float) -> bool:
        return (
            self.options.starvation != "off" and self.waited(job, now) > self.options.starvation_s
        )

    def order(self, now: float) -> list[Job]:
        starving = self._promote_starving(now)
        ahead = {job.job_id for job in starving}
        rest = [job for queue in self._queues for job in queue.values() if job.job_id not in ahead]
        return starving + rest

    def on_iteration(self, ran: Sequence[tuple[Job, int]], elapsed_s: float, now: float) -> None:
        for job, service in zip(
            (job for job, _ in ran), self._charges(ran, elapsed_s), strict=True
        ):
            if job.job_id not in self._level:
                continue
            self._waiting_since[job.job_id] = now
            self._attained[job.job_id] += service
            self._demote_if_due(job)

    def enst(self, jobs: Sequence[Job], now: float) -> dict[str, float]:
        """Estimated next scheduled time of each job (paper, section 4.3):
        ENST(i) = min(T_promote(i), T_execute(i)). T_promote is the time left until starvation
        promotion. T_execute is the service that jobs in higher queues will receive before they
        sink to i's queue, divided by the batch size: job j at level l still has its allowance
        left at l, then q_{l+1} .. q_{L-1}. (The paper writes the inner sum as running over
        level(i) < k <= level(j), which is empty for higher-priority j; we sum the quanta
        between them, which is what the text describes.)"""
        num_levels = len(self.quanta)
        count = [0] * num_levels
        left = [0.0] * num_levels  # allowance left at their current level, summed per level
        for job in jobs:
            level = self._level.get(job.job_id)
            if level is not None:
                count[level] += 1
                left[level] += max(0.0, self._allowance[job.job_id] - self._attained[job.job_id])
        ahead = [0.0] * num_levels  # service ahead of a job at level L
        for target in range(num_levels):
            for level in range(target):
                between = sum(self.quanta[level + 1 : target])
                ahead[target] += left[level] + count[level] * between
        promote_after = math.inf if self.options.starvation == "off" else self.options.starvation_s
        result = {}
        for job in jobs:
            level = self._level.get(job.job_id, 0)
            t_execute = ahead[level] / self.batch_size
            t_promote = max(0.0, promote_after - (now - self._waiting_since.get(job.job_id, now)))
            result[job.job_id] = min(t_promote, t_execute)
        return result

    # -- internals -------------------------------------------------------------------------

    def _charges(self, ran: Sequence[tuple[Job, int]], elapsed_s: float) -> list[float]:
        """Service to charge each job of `ran`, in order."""
        if self.options.charge == "whole":
            return [elapsed_s] * len(ran)
        estimates = [self._profile.chunk_cost(n, len(ran)) for _, n in ran]
        total = sum(estimates)
        if total <= 0:
            return [elapsed_s / len(ran)] * len(ran)
        return [elapsed_s * cost / total for cost in estimates]

    def _demote_if_due(self, job: Job) -> None:
        job_id = job.job_id
        level = self._level[job_id]
        moved = False
        while self._attained[job_id] > self._allowance[job_id] and level < len(self.quanta) - 1:
            self._attained[job_id] -= self._allowance[job_id]
            level += 1
            self._allowance[job_id] = self.quanta[level]
            moved = True
        if moved:
            attained = self._attained[job_id]
            self._move(job, level, allowance=self._allowance[job_id])
            self._attained[job_id] = attained

    def _move(self, job: Job, level: int, allowance: float) -> None:
        old = self._level.get(job.job_id)
        if old is not None:
            self._queues[old].pop(job.job_id, None)
        self._queues[level][job.job_id] = job
        self._level[job.job_id] = level
        self._attained[job.job_id] = 0.0
        self._allowance[job.job_id] = allowance

    def _promote_starving(self, now: float) -> list[Job]:
        mode = self.options.starvation
        if mode == "off":
            return []
        threshold = self.options.starvation_s
        starving = [
            job
            for queue in self._queues
            for job in queue.values()
            if now - self._waiting_since[job.job_id] > threshold
        ]
        starving.sort(key=lambda job: self._waiting_since[job.job_id])
        if mode == "paper":
            for job in starving:
                if self._level[job.job_id] != 0:
                    self._move(job, 0, allowance=self.quanta[0])
            return []  # they wait in Q0 behind whoever is there already
        for job in starving:
            old = self._level[job.job_id]
            if old != 0:
                self._move(job, 0, allowance=max(self._allowance[job.job_id], self.quanta[old]))
        return starving


def parse_mlfq_options(
    raw: Mapping[str, str],
    profile: PerformanceProfile,
    *,
    max_model_len: int,
    max_batch_size: int,
    skip_join: bool,
) -> MlfqOptions:
    """Builds options from `--policy-option key=value` pairs; unknown keys are an error."""
    converters = {
        "base_quantum_s": float,
        "quantum_ratio": float,
        "num_queues": int,
        "starvation_s": float,
        "charge": str,
        "starvation": str,
    }
    overrides: dict[str, object] = {"skip_join": skip_join}
    for key, value in raw.items():
        if key not in converters:
            raise ValueError(f"unknown MLFQ option {key!r}; known: {sorted(converters)}")
        overrides[key] = converters[key](value)
    return MlfqOptions.from_profile(profile, max_model_len, max_batch_size, **overrides)
