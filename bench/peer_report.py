"""What a peers run measured (calibrations, results per rate, chunk counts), throughput at the
SLO with its ratios, and the markdown report and plots made from them."""

from __future__ import annotations

import argparse
import math
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.metrics import RunMetrics
from bench.peer_check import GreedyAnswer, GreedyComparison
from bench.peer_client import ChunkCounts
from bench.peer_servers import Server
from bench.policies import Sweep, ms, plot, ratio, table

# -- SLO crossing and ratios


@dataclass(frozen=True, slots=True)
class SloThroughput:
    """The rate where latency crosses the SLO: `low` <= it <= `high` (equal when interpolated;
    `high` inf when the SLO was never crossed, `low` 0 when it was crossed at the lowest rate)."""

    low: float
    high: float

    def render(self) -> str:
        if self.low == self.high:
            return f"{self.low:.3g}"
        if math.isinf(self.high):
            return f"not reached, > {self.low:.3g}"
        return f"< {self.high:.3g}"


def slo_crossing(points: Sequence[tuple[float, float]], slo_s: float) -> SloThroughput:
    """From (rate, latency) points: the rate at which latency first rises past `slo_s`, linear
    between the last rate that met it and the first that did not."""
    ordered = sorted(p for p in points if not math.isnan(p[1]))
    if not ordered:
        return SloThroughput(0.0, math.inf)
    for i, (rate, latency) in enumerate(ordered):
        if latency > slo_s:
            if i == 0:
                return SloThroughput(0.0, rate)
            low_rate, low_latency = ordered[i - 1]
            fraction = (slo_s - low_latency) / (latency - low_latency)
            value = low_rate + fraction * (rate - low_rate)
            return SloThroughput(value, value)
    return SloThroughput(ordered[-1][0], math.inf)


def slo_ratio(numerator: SloThroughput, denominator: SloThroughput) -> str:
    """numerator / denominator, with bounds where either is only bounded."""
    if math.isinf(numerator.high) and math.isinf(denominator.high):
        return "- (neither crossed it)"
    if numerator.low == 0 and denominator.low == 0:
        return "- (both past it at the lowest rate)"
    low = numerator.low / denominator.high
    high = numerator.high / denominator.low if denominator.low > 0 else math.inf
    if low == high:
        return f"{low:.2f}x"
    return f">= {low:.2f}x" if math.isinf(high) else f"<= {high:.2f}x"


# -- the run


@dataclass(slots=True)
class Calibration:
    """What one server measured before the sweep."""

    label: str
    model: str  # the name it serves under
    version: str | None
    unloaded_per_token_latency_s: float
    unloaded_ttft_s: float
    capacity_tokens_per_s: float
    capacity_rps: float
    mean_prompt_tokens_server: float  # the server's own count of the unloaded prompts


@dataclass(slots=True)
class Run:
    calibrations: dict[str, Calibration] = field(default_factory=dict)
    greedy: dict[str, list[GreedyAnswer]] = field(default_factory=dict)  # label -> per prompt
    comparisons: list[GreedyComparison] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    slo_s: float = math.nan
    results: dict[str, list[RunMetrics]] = field(default_factory=dict)
    chunks: dict[str, list[ChunkCounts]] = field(default_factory=dict)  # label -> per rate
    servers: dict[str, Server] = field(default_factory=dict)  # how each was started (last time)
    mean_prompt_tokens: float = 0.0
    mean_output_tokens: float = 0.0
    vllm_version: str | None = None


# -- the report


def describe_server(run: Run, label: str) -> str:
    """How a server was run, for the report's header."""
    server = run.servers.get(label)
    calibration = run.calibrations.get(label)
    version = ""
    if calibration is not None and calibration.version:
        version = f" (server version {calibration.version})"
    if server is None or not server.command:
        return f"`{label}`: already running at {server.url if server else '?'}{version}"
    argv = [Path(server.command[0]).name, *server.command[1:]]
    env = [f"{k}={v}" for k, v in server.env.items() if k.startswith(("VLLM_CPU", "OMP"))]
    return f"`{label}`: `{shlex.join([*env, *argv])}`{version}"


def render_report(args: argparse.Namespace, run: Run, elapsed_s: float) -> str:
    peer = args.peer_spec.label if args.peer_spec else None
    fastserves = [s.label for s in args.servers if s.is_fastserve]
    arrival = args.arrival + (f" (CV {args.cv:g})" if args.arrival == "gamma" else "")
    calibrations = list(run.calibrations.values())
    best = min(calibrations, key=lambda c: c.unloaded_per_token_latency_s)
    slowest = min(calibrations, key=lambda c: c.capacity_rps)
    worst_lag_s = max((m.p99_send_lag_s for rs in run.results.values() for m in rs), default=0)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    if args.kv_tokens is None:
        memory = "no memory pressure: each server's default KV pool"
    else:
        memory = (
            f"memory pressure: KV for {args.kv_tokens} tokens on each (FastServe `--kv-blocks`; "
            f"vLLM `--num-gpu-blocks-override`, blocks of {args.vllm_block_size} plus its null "
            "block), requests clipped to that context"
        )
    rates_note = (
        "given by `--rates`"
        if args.rates
        else f"{', '.join(f'{f:g}' for f in args.fractions)} x the slower server's capacity "
        f"({slowest.label}, {slowest.capacity_rps:.3g} req/s)"
    )
    lines = [
        f"# FastServe vs {peer or 'nothing'}: {args.model_label}, {args.dataset}, {arrival}",
        "",
        f"Generated by `{shlex.join(['python', '-m', 'bench.peers', *args.argv])}` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPU cores, in "
        f"{elapsed_s / 60:.1f} min. One server at a time; the same requests for every server.",
        "",
        f"- Model: `{args.model}`, float32, batch cap {args.max_batch_size} and "
        f"{args.max_batched_tokens} batched tokens on every server; {memory}.",
        *(f"- {describe_server(run, label)}" for label in run.calibrations),
        f"- FastServe's environment: OMP_NUM_THREADS={threads}.",
        f"- Workload: {args.num_requests} requests per rate, {args.dataset}-shaped lengths x "
        f"{args.scale:g} (mean prompt {run.mean_prompt_tokens:.0f}, mean output "
        f"{run.mean_output_tokens:.0f} tokens), {arrival} arrivals, seed {args.seed}; sent to "
        "`/v1/completions`, streamed, temperature 0, `ignore_eos` and `max_tokens` = the "
        "intended output length.",
        f"- Rates: {rates_note}: {', '.join(f'{r:.3g}' for r in run.rates)} req/s.",
        f"- SLO: {args.slo_factor:g}x the better unloaded per-token latency ({best.label}, "
        f"{ms(best.unloaded_per_token_latency_s)} ms) = {ms(run.slo_s)} ms per token.",
        f"- Client check: at every point, 99% of requests were sent within {ms(worst_lag_s)} ms "
        "of their arrival time.",
        "",
        "Per-token latency is job latency (arrival to last token) / output tokens; TTFT is "
        "arrival to the first chunk with text; TPOT the time per output token after the first. "
        "Latencies in ms; output tokens from each server's `usage`.",
        "",
        "## Calibration",
        "",
        f"Unloaded: {args.num_unloaded} workload requests one at a time. Saturated: "
        f"{args.num_burst} copies of an average request at once, after a warm-up.",
        "",
    ]
    rows = [
        [
            c.label,
            ms(c.unloaded_per_token_latency_s),
            ms(c.unloaded_ttft_s),
            f"{c.capacity_tokens_per_s:.0f}",
            f"{c.capacity_rps:.3g}",
            f"{c.mean_prompt_tokens_server:.1f}",
        ]
        for c in calibrations
    ]
    columns = ["server", "unloaded per-token", "unloaded TTFT", "saturated output tokens/s"]
    columns += ["capacity (req/s)", "prompt tokens (server's count, mean)"]
    lines += table(columns, rows)
    lines += ["", "## Results", ""]
    columns = ["server", "rate (req/s)", "mean per-token", "P95 per-token", "mean TTFT"]
    columns += ["P95 TTFT", "mean TPOT", "throughput (req/s)", "output tokens/s", "errors"]
    rows = []
    for label, runs in run.results.items():
        for m in runs:
            latencies = [m.mean_per_token_latency_s, m.p95_per_token_latency_s, m.mean_ttft_s]
            latencies += [m.p95_ttft_s, m.mean_tpot_s]
            rates = [f"{m.throughput_rps:.3g}", f"{m.throughput_tokens_per_s:.0f}"]
            rows.append(
                [label, f"{m.rate_rps:.3g}", *map(ms, latencies), *rates, str(m.num_errors)]
            )
    lines += table(columns, rows)
    slo = {label: slo_throughputs(runs, run.slo_s) for label, runs in run.results.items()}
    lines += [
        "",
        "## Throughput at the SLO",
        "",
        f"The rate at which per-token latency (mean, or P95) rises past the SLO ({ms(run.slo_s)} "
        "ms), interpolated linearly between the tested rates around the crossing.",
        "",
    ]
    rows = [[label, mean.render(), p95.render()] for label, (mean, p95) in slo.items()]
    lines += table(["server", "at the mean SLO (req/s)", "at the P95 SLO (req/s)"], rows)
    lines += ["", *render_ratios(run, fastserves, peer, slo)]
    lines += ["", *render_chunks(run)]
    lines += ["", *render_greedy(args, run)]
    lines += ["", "## Plots", "", f"![mean per-token latency]({args.name}-per-token-latency.png)"]
    lines += ["", f"![P95 per-token latency]({args.name}-p95.png)", ""]
    lines += [f"![throughput]({args.name}-throughput.png)", ""]
    return "\n".join(lines)


def slo_throughputs(runs: list[RunMetrics], slo_s: float) -> tuple[SloThroughput, SloThroughput]:
    """Throughput at the SLO on the mean and on the P95 per-token latency."""
    mean = slo_crossing([(m.rate_rps, m.mean_per_token_latency_s) for m in runs], slo_s)
    p95 = slo_crossing([(m.rate_rps, m.p95_per_token_latency_s) for m in runs], slo_s)
    return mean, p95


def render_ratios(
    run: Run,
    fastserves: list[str],
    peer: str | None,
    slo: dict[str, tuple[SloThroughput, SloThroughput]],
) -> list[str]:
    if peer is None or peer not in run.results:
        return ["## FastServe / peer", "", "No peer was run."]
    fastserves = [f for f in fastserves if f in run.results]
    lines = [
        f"## FastServe / {peer}",
        "",
        "Each FastServe run divided by the peer's. Latency: below 1x means FastServe is faster. "
        "Throughput: above 1x means FastServe serves more. `>=` / `<=` where a server never "
        "crossed the SLO within the tested rates (or crossed it below the lowest).",
        "",
    ]
    base = run.calibrations[peer]
    rows = []
    calib = [
        ("unloaded per-token latency", "unloaded_per_token_latency_s"),
        ("unloaded TTFT", "unloaded_ttft_s"),
        ("saturated output tokens/s", "capacity_tokens_per_s"),
    ]
    for name, attr in calib:
        values = [
            ratio(getattr(run.calibrations[f], attr), getattr(base, attr)) for f in fastserves
        ]
        rows.append([name, *values])
    for index, which in enumerate(["mean", "P95"]):
        values = [slo_ratio(slo[f][index], slo[peer][index]) for f in fastserves]
        rows.append([f"throughput at the {which} per-token SLO", *values])
    attrs = [
        ("mean per-token", "mean_per_token_latency_s"),
        ("P95 per-token", "p95_per_token_latency_s"),
        ("mean TTFT", "mean_ttft_s"),
    ]
    for i, rate in enumerate(run.rates):
        for name, attr in attrs:
            values = [
                ratio(getattr(run.results[f][i], attr), getattr(run.results[peer][i], attr))
                for f in fastserves
            ]
            rows.append([f"{name} at {rate:.3g} req/s", *values])
    return lines + table(["metric", *(f"{f} / {peer}" for f in fastserves)], rows)


def render_chunks(run: Run) -> list[str]:
    lines = [
        "## SSE chunks per stream",
        "",
        "SSE chunks (events with a choice; not the usage-only one) against output tokens "
        "(`usage`), per stream. One chunk per token lets a client time every token; fewer "
        "chunks than tokens means tokens were merged (or a token's text was held back and sent "
        "with the next one: an incomplete UTF-8 character).",
        "",
    ]
    columns = ["server", "rate (req/s)", "streams", "output tokens", "chunks", "with text"]
    columns += ["streams with fewer chunks than tokens", "with more", "tokens per chunk"]
    rows = []
    for label, per_rate in run.chunks.items():
        total = sum(per_rate, ChunkCounts())
        points = [(f"{r:.3g}", c) for r, c in zip(run.rates, per_rate, strict=True)]
        for rate, c in [*points, ("all", total)]:
            per_chunk = f"{c.tokens / c.chunks:.3f}" if c.chunks else "-"
            counts = [c.streams, c.tokens, c.chunks, c.text_chunks, c.fewer, c.more]
            rows.append([label, rate, *map(str, counts), per_chunk])
    return lines + table(columns, rows)


def render_greedy(args: argparse.Namespace, run: Run) -> list[str]:
    reference = args.servers[0].label
    lines = [
        "## Greedy check",
        "",
        f"{args.check_prompts} prompts, {args.check_tokens} tokens at temperature 0 with "
        f"`ignore_eos`, each server against `{reference}`; a run stops when a server disagrees "
        f"within the first {args.min_agree} tokens or answers empty text.",
        "",
    ]
    rows = []
    for c in run.comparisons:
        agreed = "all" if c.identical else f"first {c.agreed_tokens}"
        text = "same" if c.identical else f"{c.answer.text!r} vs {c.reference.text!r}"
        rows.append([c.server, repr(c.prompt), agreed, text.replace("|", "\\|")])
    if not rows:
        return [*lines, "Only one server ran."]
    return lines + table(["server", "prompt", "tokens that agree", "text"], rows)


def plot_throughput(path: Path, run: Run, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in run.results.items():
        rates = [m.rate_rps for m in runs]
        ax.plot(rates, [m.throughput_tokens_per_s for m in runs], marker="o", label=label)
    offered = [r * run.mean_output_tokens for r in run.rates]
    ax.plot(run.rates, offered, color="grey", linestyle=":", label="offered")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(args: argparse.Namespace, run: Run, elapsed_s: float) -> str:
    args.out.mkdir(parents=True, exist_ok=True)
    report = render_report(args, run, elapsed_s)
    (args.out / f"{args.name}.md").write_text(report)
    sweep = Sweep(run.rates, dict(run.results))
    slo_line = (run.slo_s, f"SLO ({args.slo_factor:g}x better unloaded)")
    what = f"({args.model_label}, {args.dataset}, {args.arrival})"
    plot(
        args.out / f"{args.name}-per-token-latency.png",
        sweep,
        "mean_per_token_latency_s",
        f"Mean per-token latency {what}",
        slo_line,
    )
    plot(
        args.out / f"{args.name}-p95.png",
        sweep,
        "p95_per_token_latency_s",
        f"P95 per-token latency {what}",
        slo_line,
    )
    plot_throughput(args.out / f"{args.name}-throughput.png", run, f"Throughput {what}")
    return report
