"""The scheduler's Stats RPC answer, read by series name: the names of
services/scheduler/stats_table.py, without the `fastserve_scheduler_` prefix and without the
`_total` Prometheus adds to counters (`stats["finished_jobs"]`, `stats.per_stage("busy")`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastserve.scheduler.v1 import scheduler_pb2

Samples = list[tuple[dict[str, str], float]]


@dataclass(frozen=True, slots=True)
class SchedulerStatsView:
    policy: str
    kv_policy: str
    block_size_tokens: int
    series: dict[str, Samples] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, response: scheduler_pb2.StatsResponse) -> SchedulerStatsView:
        return cls(
            policy=response.policy,
            kv_policy=response.kv_policy,
            block_size_tokens=response.block_size_tokens,
            series={
                metric.name: [(dict(s.labels), s.value) for s in metric.samples]
                for metric in response.metrics
            },
        )

    def __getitem__(self, name: str) -> float:
        """The value of a series without labels."""
        ((labels, value),) = self.series[name]
        assert not labels, f"{name} has labels {labels}: use samples() or per_stage()"
        return value

    def samples(self, name: str) -> Samples:
        return self.series[name]

    def per_stage(self, name: str) -> list[float]:
        """A per-stage series (`stage_` prefix implied), in stage order."""
        samples = self.series[f"stage_{name}"]
        return [value for _, value in sorted(samples, key=lambda s: int(s[0]["stage"]))]
