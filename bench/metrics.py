"""Latency and throughput metrics of a benchmark run, as the FastServe paper defines them: pure.

The paper's headline metric is the latency per output token of each job: (finish - arrival) /
output tokens, so that long and short jobs weigh alike; it reports its mean and P95. On top:
time to first token (TTFT), time per output token after the first (TPOT), throughput, goodput
(requests/s finishing within an SLO on per-token latency), and, over a sweep of rates, the
throughput at the SLO: the highest tested rate whose P95 per-token latency meets it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class RequestRecord:
    """What the load generator saw of one request; times in seconds from the start of the run."""

    # Index of the request in the workload.
    index: int
    # When the request was due (its arrival in the workload): latencies count from here.
    arrival_s: float
    # Output tokens requested (max_tokens, with ignore_eos).
    requested_output_tokens: int
    # When the request was actually sent (later than arrival_s if the client held it back).
    sent_s: float | None = None
    # When the first output token arrived.
    first_token_s: float | None = None
    # When the last message arrived (or the error).
    end_s: float | None = None
    # Prompt and output tokens from the server's usage (0 if it never came).
    prompt_tokens: int = 0
    output_tokens: int = 0
    # How often the job was preempted (`state == "preempted"` chunks).
    num_preemptions: int = 0
    # Queue level the scheduler admitted the job to (first `queued` chunk), if it said.
    queue_level: int | None = None
    # The finish reason ("length" with ignore_eos), or None on error.
    finish_reason: str | None = None
    # Error text when the request failed.
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None and self.output_tokens > 0

    @property
    def latency_s(self) -> float:
        assert self.end_s is not None
        return self.end_s - self.arrival_s

    @property
    def per_token_latency_s(self) -> float:
        """Job latency divided by output tokens: the paper's metric."""
        return self.latency_s / self.output_tokens

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time between output tokens after the first; None with fewer than two."""
        if self.first_token_s is None or self.end_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class RunMetrics:
    """Metrics of one run: one policy at one offered rate. Latencies in seconds."""

    # Offered request rate.
    rate_rps: float
    num_requests: int
    num_errors: int
    # Per-token latency (job latency / output tokens), over successful requests.
    mean_per_token_latency_s: float
    p95_per_token_latency_s: float
    mean_ttft_s: float
    p95_ttft_s: float
    # Mean over requests of their time per output token after the first.
    mean_tpot_s: float
    # Completed requests and output tokens per second, over first arrival to last finish.
    throughput_rps: float
    throughput_tokens_per_s: float
    # Completed requests per second whose per-token latency met the SLO.
    goodput_rps: float
    # Preemptions seen over all requests.
    num_preemptions: int
    # Per-token latency of the short jobs only (NaN when no split was asked for).
    short_mean_per_token_latency_s: float = math.nan
    short_p95_per_token_latency_s: float = math.nan
    # P99 of the delay between a request's arrival and its send: near 0 unless the client lagged
    # (or its concurrency bound held requests back).
    p99_send_lag_s: float = math.nan
    # From the scheduler's Stats after the run (its window: the last 1,000 iterations), filled in
    # by the caller: mean iteration time and the worker forward's share of it. They show how fast
    # the machine ran; on a shared 2-core VM the forward alone varies by up to 2x between runs.
    mean_iteration_ms: float = math.nan
    mean_forward_ms: float = math.nan
    mean_batch_jobs: float = math.nan  # the scheduler's, over its last 1000 batches
    mean_batch_tokens: float = math.nan


def summarize(
    records: Sequence[RequestRecord],
    rate_rps: float,
    slo_s: float,
    *,
    short_max_output_tokens: int | None = None,
) -> RunMetrics:
    """Metrics of one run. `slo_s` bounds per-token latency for goodput; requests asking for at
    most `short_max_output_tokens` output tokens are the short jobs."""
    done = [r for r in records if r.ok]
    per_token = [r.per_token_latency_s for r in done]
    ttfts = [t for r in done if (t := r.ttft_s) is not None]
    tpots = [t for r in done if (t := r.tpot_s) is not None]
    lags = [r.sent_s - r.arrival_s for r in records if r.sent_s is not None]
    span_s = span_seconds(records)
    per_s = 1 / span_s if span_s > 0 else math.nan
    short = []
    if short_max_output_tokens is not None:
        short = [
            r.per_token_latency_s
            for r in done
            if r.requested_output_tokens <= short_max_output_tokens
        ]
    return RunMetrics(
        rate_rps=rate_rps,
        num_requests=len(records),
        num_errors=len(records) - len(done),
        mean_per_token_latency_s=mean(per_token),
        p95_per_token_latency_s=percentile(per_token, 95),
        mean_ttft_s=mean(ttfts),
        p95_ttft_s=percentile(ttfts, 95),
        mean_tpot_s=mean(tpots),
        throughput_rps=len(done) * per_s,
        throughput_tokens_per_s=sum(r.output_tokens for r in done) * per_s,
        goodput_rps=sum(1 for t in per_token if t <= slo_s) * per_s,
        num_preemptions=sum(r.num_preemptions for r in records),
        short_mean_per_token_latency_s=mean(short),
        short_p95_per_token_latency_s=percentile(short, 95),
        p99_send_lag_s=percentile(lags, 99),
    )


def span_seconds(records: Sequence[RequestRecord]) -> float:
    """From the first arrival to the last successful finish (0 when nothing finished)."""
    ends = [r.end_s for r in records if r.ok and r.end_s is not None]
    if not ends:
        return 0.0
    return max(ends) - min(r.arrival_s for r in records)


def throughput_at_slo(points: Iterable[tuple[float, float]], slo_s: float) -> float | None:
    """The highest rate among (rate, P95 per-token latency) points whose P95 meets the SLO."""
    meeting = [rate for rate, p95 in points if p95 <= slo_s]
    return max(meeting) if meeting else None


def knee_rate(points: Iterable[tuple[float, float]], threshold_s: float) -> float | None:
    """The lowest rate among (rate, latency) points whose latency reaches `threshold_s`."""
    reaching = [rate for rate, latency in points if latency >= threshold_s]
    return min(reaching) if reaching else None
