"""The Gittins-index policy: the best a scheduler can do without knowing each job's length, when
it knows the distribution of lengths. A bound for the simulator (bench/simulate.py), as
srpt-oracle is the bound for a scheduler that knows every length.

A job that has produced `a` tokens gets the index

    G(a) = max over b > a of  E[w(S) ; a < S <= b]  /  E[min(S, b) - a ; S > a]

where S is the output length: the best rate, in weight finished per token of service, at which
serving the job from age a can pay off. The job with the highest index runs first. With w = 1
this minimises mean latency in an M/G/1 queue (Gittins 1989; Scully and Harchol-Balter, 2021);
with w(S) = 1 / S it targets mean latency per output token, the policy benchmark's metric.
MLFQ and its limit, least-attained-service first, are the Gittins policy when the index falls
with age (lengths with a decreasing hazard rate); FCFS is when it rises. Measured against the
output-length distribution of bench/workload.py, this says how far skip-join MLFQ is from the
best non-clairvoyant order, rather than from the oracle.

Pure: no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from services.scheduler.core.baselines import FcfsPolicy
from services.scheduler.core.job import Job


def gittins_indices(lengths: Iterable[int], weighted: bool = True) -> list[float]:
    """G(a) for ages a = 0 .. max(lengths) - 1, from the empirical distribution of `lengths`
    (output tokens, each >= 1). O(n^2) in the longest length."""
    counts = Counter(lengths)
    if not counts or min(counts) < 1:
        raise ValueError("need at least one length, all >= 1")
    longest = max(counts)
    total = sum(counts.values())
    p = [counts.get(s, 0) / total for s in range(longest + 1)]
    weight = [p[s] / s if weighted and s else p[s] for s in range(longest + 1)]
    survival = [0.0] * (longest + 1)  # P(S > t)
    for t in range(longest - 1, -1, -1):
        survival[t] = survival[t + 1] + p[t + 1]
    indices = []
    for age in range(longest):
        best = gained = spent = 0.0
        for b in range(age + 1, longest + 1):
            gained += weight[b]  # finishes at b
            spent += survival[b - 1]  # every job still running at b - 1 gets one more token
            if spent > 0:
                best = max(best, gained / spent)
        indices.append(best)
    return indices


class GittinsPolicy(FcfsPolicy):
    """Orders jobs by the Gittins index of their age (output tokens so far), highest first, ties
    in arrival order (fcfs's bookkeeping, another order). Past the longest length seen, a job
    keeps the last index."""

    name = "gittins"

    def __init__(self, indices: Sequence[float]) -> None:
        super().__init__()
        if not indices:
            raise ValueError("need at least one index")
        self._indices = list(indices)

    def index(self, job: Job) -> float:
        return self._indices[min(job.num_output_tokens, len(self._indices) - 1)]

    def order(self, now: float) -> list[Job]:
        return sorted(super().order(now), key=lambda job: -self.index(job))  # stable
