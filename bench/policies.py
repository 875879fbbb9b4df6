"""Scheduling-policy benchmark: per-token latency of each policy against the offered request rate.

For each policy variant, starts `fastserve up --policy NAME [--policy-option K=V ...]` (one stack
at a time), replays the same synthetic workload (`bench/workload.py`) at each rate with an
open-loop client (`bench/loadgen.py`), and reports the paper's metrics (`bench/metrics.py`): a
Markdown table, a summary of how much faster each policy is than fcfs where fcfs saturates, and
two plots. Before the sweep, an fcfs stack measures the unloaded per-token latency (a few
requests, one at a time), which sets the SLO, and the throughput of a saturating burst, which
sets the rates unless `--rates` is given. See bench/README.md. Usage:

    .venv/bin/python -m bench.policies [--quick] [--model tiny] [--policies SPEC ...]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from bench import loadgen, metrics, multiturn, workload
from bench.metrics import RunMetrics
from bench.variants import Variant, parse_variant
from fastserve_client import Client
from services.scheduler.core.config import KV_POLICIES
from testing.stack import Stack
from testing.tiny_model import tiny_llama_dir

# Paper's policy, its baselines, and three ablations of ours (docs/design.md, section 5).
DEFAULT_POLICIES = [
    "fcfs",
    "skip-join-mlfq",
    "mlfq",
    "srpt-oracle",
    "skip-join-mlfq:charge=whole",
    "skip-join-mlfq:backfill=off",
    "skip-join-mlfq:starvation=paper",
]
QUICK_POLICIES = DEFAULT_POLICIES[:4]
# Fractions of the estimated maximum throughput to offer, when no --rates are given.
DEFAULT_FRACTIONS = [0.6, 0.9, 1.2, 1.5]
QUICK_FRACTIONS = [0.6, 1.0, 1.5]


@dataclass(frozen=True, slots=True)
class Calibration:
    """What the fcfs stack measured before the sweep."""

    max_context_tokens: int
    # Mean per-token latency of requests sent one at a time.
    unloaded_per_token_latency_s: float
    # Output tokens/s of a saturating burst, and that over the workload's mean output length.
    capacity_tokens_per_s: float
    capacity_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    # Requests asking for at most this many output tokens are the short jobs (None: no split).
    short_max_output_tokens: int | None
    # The burst that measures capacity (and warms up every stack): copies of an average request.
    average_request: workload.Request
    num_burst: int


@dataclass(slots=True)
class Sweep:
    rates: list[float]
    results: dict[str, list[RunMetrics]] = field(default_factory=dict)  # label -> one per rate
    failures: dict[str, str] = field(default_factory=dict)  # label -> why it did not run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with defaults resolved (`--quick` and model dependent ones), plus `variants`
    (fcfs first), `stack_flags` (for `fastserve up`), `model_label` and `fractions`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, or a model name or path")
    parser.add_argument("--dataset", choices=sorted(workload.DATASETS), default="sharegpt")
    parser.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    parser.add_argument("--cv", type=float, default=1.0, help="Gamma arrivals: CV of the gaps")
    parser.add_argument("--num-requests", type=int, help="per rate (default 200, quick 50)")
    parser.add_argument("--rates", help="requests/s, comma-separated (default: calibrated)")
    parser.add_argument("--rate-fractions", help="of the measured capacity, when no --rates")
    parser.add_argument(
        "--policies",
        nargs="+",
        metavar="SPEC",
        help="[label=]policy[:key=value,...][@kv-policy] each (default: all seven; quick: the "
        "first four)",
    )
    parser.add_argument(
        "--kv-policy", choices=KV_POLICIES, help="for variants without @kv-policy (default: up's)"
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-batched-tokens", type=int, default=2048)
    parser.add_argument("--num-blocks", type=int, help="KV blocks (default: the server's)")
    parser.add_argument("--scale", type=float, help="length factor (default 0.25 tiny, else 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="report name (default from model, dataset, arrival)")
    parser.add_argument("--slo-factor", type=float, default=5.0, help="x unloaded latency")
    parser.add_argument("--knee-factor", type=float, default=5.0, help="summary's fcfs load")
    parser.add_argument("--short-quantile", type=float, default=0.5, help="0 disables")
    parser.add_argument("--num-unloaded", type=int, default=8)
    parser.add_argument("--max-concurrency", type=int, default=loadgen.DEFAULT_MAX_CONCURRENCY)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--quick", action="store_true", help="fewer requests, rates, policies")
    args = parser.parse_args(argv)

    args.model_label = "tiny" if args.model == "tiny" else Path(args.model).name.lower()
    args.stack_flags = [
        f"--max-batch-size={args.max_batch_size}",
        f"--max-batched-tokens={args.max_batched_tokens}",
    ]
    if args.num_blocks is not None:
        args.stack_flags.append(f"--num-blocks={args.num_blocks}")
    if args.kv_policy is not None:
        args.stack_flags.append(f"--kv-policy={args.kv_policy}")
    specs = args.policies or (QUICK_POLICIES if args.quick else DEFAULT_POLICIES)
    try:
        variants = [parse_variant(spec) for spec in specs]
    except ValueError as error:
        parser.error(str(error))
    if len({v.label for v in variants}) != len(variants):
        parser.error("policy labels must be distinct")
    # The first plain fcfs goes first: the calibration stack is a plain fcfs one, reused for its
    # sweep. The rest keep their order, so a baseline listed again last measures the drift.
    first = next((v for v in variants if v.is_plain_fcfs), None)
    args.variants = [first, *(v for v in variants if v is not first)] if first else variants
    args.fractions = QUICK_FRACTIONS if args.quick else DEFAULT_FRACTIONS
    if args.rate_fractions:
        args.fractions = [float(f) for f in args.rate_fractions.split(",")]
    args.rates = [float(r) for r in args.rates.split(",")] if args.rates else None
    args.num_requests = args.num_requests or (50 if args.quick else 200)
    args.scale = args.scale or (0.25 if args.model == "tiny" else 1.0)
    args.cv = args.cv if args.arrival == "gamma" else 1.0
    suffix = "-quick" if args.quick else ""
    args.name = args.name or f"policies-{args.model_label}-{args.dataset}-{args.arrival}{suffix}"
    return args


def up_flags(args: argparse.Namespace, variant: Variant) -> list[str]:
    """`fastserve up` flags for a variant: the sweep's, then the variant's (later flags win, so
    a variant's own `@kv-policy` overrides `--kv-policy`)."""
    return [*args.stack_flags, *variant.flags()]


def make_requests(
    args: argparse.Namespace, rate_rps: float, max_context_tokens: int
) -> list[workload.Request]:
    shape = {"dataset": args.dataset, "arrival": args.arrival, "cv": args.cv, "scale": args.scale}
    return workload.make_workload(
        args.num_requests, rate_rps, max_context_tokens=max_context_tokens, seed=args.seed, **shape
    )


def warm_up(stack: Stack, average: workload.Request, num_burst: int) -> float:
    """3 short requests, then a burst of `num_burst` average ones (returns its output tokens/s),
    so that first-call costs (allocations, lazy set-up) stay out of the data."""
    loadgen.run_sequential(stack.address, [workload.Request(0.0, "the " * 8, 8)] * 3)
    return loadgen.burst_tokens_per_s(stack.address, average, num_burst)


def calibrate(args: argparse.Namespace, stack: Stack) -> Calibration:
    with Client(stack.address) as client:
        max_context_tokens = client.list_models()[0].max_context_tokens
    requests = make_requests(args, 1.0, max_context_tokens)
    mean_prompt, mean_output = workload.mean_lengths(requests)
    prompt = workload.make_prompt(round(mean_prompt), random.Random(args.seed))
    average = workload.Request(0.0, prompt, round(mean_output))
    num_burst = 2 * args.max_batch_size
    warm_up(stack, average, num_burst)
    unloaded = loadgen.run_sequential(stack.address, requests[: args.num_unloaded])
    if errors := {r.error for r in unloaded if not r.ok}:
        raise RuntimeError(f"unloaded requests failed: {errors}")
    capacity = loadgen.burst_tokens_per_s(stack.address, average, num_burst)
    short_max = None
    if args.short_quantile > 0:
        outputs = [r.output_tokens for r in requests]
        short_max = math.floor(metrics.percentile(outputs, 100 * args.short_quantile))
    return Calibration(
        max_context_tokens=max_context_tokens,
        unloaded_per_token_latency_s=metrics.mean([r.per_token_latency_s for r in unloaded]),
        capacity_tokens_per_s=capacity,
        capacity_rps=capacity / mean_output,
        mean_prompt_tokens=mean_prompt,
        mean_output_tokens=mean_output,
        short_max_output_tokens=short_max,
        average_request=average,
        num_burst=num_burst,
    )


def run_variant(
    args: argparse.Namespace,
    calibration: Calibration,
    variant: Variant,
    rates: list[float],
    stack: Stack,
    progress: tqdm,
) -> list[RunMetrics]:
    """Replays the workload at every rate on a running stack."""
    slo_s = args.slo_factor * calibration.unloaded_per_token_latency_s
    policy = stack.scheduler_stats().policy
    if policy != variant.policy:
        progress.write(f"warning: {variant.label}: the scheduler reports policy {policy!r}")

    def show(num_done: int, total: int) -> None:
        progress.set_postfix_str(f"{num_done}/{total} requests", refresh=False)
        progress.update(0)  # redraws at most every `mininterval`

    results = []
    for rate in rates:
        progress.set_description(f"{variant.label} @ {rate:.3g} req/s")
        requests = make_requests(args, rate, calibration.max_context_tokens)
        records = loadgen.run_replay(
            stack.address, requests, max_concurrency=args.max_concurrency, on_progress=show
        )
        point = metrics.summarize(
            records, rate, slo_s, short_max_output_tokens=calibration.short_max_output_tokens
        )
        stats = stack.scheduler_stats()
        point = replace(
            point,
            mean_iteration_ms=1000 * stats["mean_iteration_seconds"],
            mean_forward_ms=1000 * stats["mean_forward_seconds"],
            mean_batch_jobs=stats["mean_batch_jobs"],
            mean_batch_tokens=stats["mean_batch_tokens"],
        )
        if point.num_errors:
            first = next(r.error for r in records if not r.ok)
            progress.write(f"{variant.label} @ {rate:.3g}: {point.num_errors} errors: {first}")
        results.append(point)
        progress.update(1)
    return results


def sweep_policies(args: argparse.Namespace, model: str | Path) -> tuple[Calibration, Sweep]:
    """Calibrates on fcfs, then runs every variant at every rate, one stack at a time."""
    print(f"calibrating on fcfs ({args.model}) ...", file=sys.stderr, flush=True)
    baseline = args.variants[0] if args.variants[0].is_plain_fcfs else Variant("fcfs", "fcfs")
    stack: Stack | None = Stack.start(model, *up_flags(args, baseline))
    try:
        calibration = calibrate(args, stack)
        if not args.variants[0].is_plain_fcfs:  # else the calibration stack serves fcfs's sweep
            stack.stop()
            stack = None
        rates = args.rates or [float(f"{f * calibration.capacity_rps:.3g}") for f in args.fractions]
        sweep = Sweep(rates)
        unloaded, capacity = calibration.unloaded_per_token_latency_s, calibration.capacity_rps
        note = f"unloaded {ms(unloaded)} ms/token, {capacity:.3g} req/s max; rates {rates}"
        print(note, file=sys.stderr, flush=True)
        num_points = len(args.variants) * len(rates)
        redraw_s = 0.1 if sys.stderr.isatty() else 10.0  # a log file gets fewer lines
        with tqdm(total=num_points, unit="point", mininterval=redraw_s) as progress:
            for variant in args.variants:
                if stack is None:
                    progress.set_description(f"{variant.label}: starting")
                    try:
                        stack = Stack.start(model, *up_flags(args, variant))
                        warm_up(stack, calibration.average_request, calibration.num_burst)
                    except RuntimeError as error:  # start-up or warm-up failed: skip the variant
                        lines = str(error).strip().splitlines()  # the launcher's last words last
                        why = next((x for x in lines[::-1] if not x.startswith("fastserve")), "")
                        sweep.failures[variant.label] = why
                        progress.write(f"{variant.label}: failed to start: {why}")
                        progress.update(len(rates))
                        if stack is not None:
                            stack.stop()
                            stack = None
                        continue
                try:
                    sweep.results[variant.label] = run_variant(
                        args, calibration, variant, rates, stack, progress
                    )
                finally:
                    stack.stop()
                    stack = None
    finally:
        if stack is not None:
            stack.stop()
    return calibration, sweep


def ms(seconds: float) -> str:
    if math.isnan(seconds):  # no successful request
        return "-"
    value = 1e3 * seconds
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def ratio(numerator: float, denominator: float) -> str:
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return "-"
    return f"{numerator / denominator:.2f}x"


def table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_report(
    args: argparse.Namespace, calibration: Calibration, sweep: Sweep, elapsed_s: float
) -> str:
    unloaded_s = calibration.unloaded_per_token_latency_s
    slo_s = args.slo_factor * unloaded_s
    arrival = args.arrival + (f" (CV {args.cv:g})" if args.arrival == "gamma" else "")
    worst_lag_s = max((m.p99_send_lag_s for rs in sweep.results.values() for m in rs), default=0)
    lines = [
        f"# Scheduling policies: {args.model_label}, {args.dataset}, {arrival}",
        "",
        f"Generated by `{' '.join(['python', '-m', 'bench.policies', *sys.argv[1:]])}` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPU cores, in "
        f"{elapsed_s / 60:.1f} min.",
        "",
        f"- Model: `{args.model}` (context {calibration.max_context_tokens} tokens); server "
        f"flags `{' '.join(args.stack_flags)}`.",
        f"- Workload: {args.num_requests} requests per rate, {args.dataset}-shaped lengths "
        f"x {args.scale:g} (mean prompt {calibration.mean_prompt_tokens:.0f}, mean output "
        f"{calibration.mean_output_tokens:.0f} tokens), {arrival} arrivals, seed {args.seed}; "
        "the same requests for every policy and rate.",
        f"- Unloaded per-token latency (fcfs, {args.num_unloaded} requests one at a time): "
        f"{ms(unloaded_s)} ms. SLO: {args.slo_factor:g}x that = {ms(slo_s)} ms per token.",
        f"- Capacity (fcfs, a burst of {calibration.num_burst} average requests): "
        f"{calibration.capacity_tokens_per_s:.0f} output tokens/s = "
        f"{calibration.capacity_rps:.3g} req/s.",
        f"- Client check: at every point, 99% of requests were sent within {ms(worst_lag_s)} ms "
        "of their arrival time (more would mean the load generator, not the server, set the pace).",
        "",
        "Per-token latency is job latency (arrival to last token) / output tokens; TPOT is the "
        "time per output token after the first; goodput counts requests/s meeting the SLO. "
        "Latencies in ms. The last two columns are the scheduler's mean iteration and worker "
        "forward time, and jobs and tokens in a batch, over its last 1000 batches at the end of "
        "each point: a slower step with the same batch means the machine ran slower.",
        "",
        "## Results",
        "",
    ]
    columns = ["policy", "rate (req/s)", "mean per-token", "P95 per-token", "mean TTFT"]
    columns += ["P95 TTFT", "mean TPOT", "throughput (req/s)", "output tokens/s"]
    columns += ["goodput (req/s)", "preemptions", "errors", "iteration / forward ms"]
    columns += ["jobs / tokens a batch"]
    rows = [result_row(label, m) for label, runs in sweep.results.items() for m in runs]
    rows += [
        [label, f"failed to start: {why}", *[""] * 12] for label, why in sweep.failures.items()
    ]
    lines += table(columns, rows)
    lines += [
        "",
        "## Throughput at the SLO",
        "",
        f"The highest tested rate whose P95 per-token latency is within the SLO ({ms(slo_s)} ms).",
        "",
    ]
    rows = []
    for label, runs in sweep.results.items():
        best = metrics.throughput_at_slo(
            [(m.rate_rps, m.p95_per_token_latency_s) for m in runs], slo_s
        )
        rows.append([label, f"below {min(sweep.rates):.3g}" if best is None else f"{best:.3g}"])
    lines += table(["policy", "throughput at SLO (req/s)"], rows)
    lines += ["", "## Summary", "", *render_summary(args, calibration, sweep)]
    lines += ["", "## Plots", "", f"![mean per-token latency]({args.name}-per-token-latency.png)"]
    lines += ["", f"![P95 per-token latency]({args.name}-p95.png)", ""]
    return "\n".join(lines)


def result_row(label: str, m: RunMetrics) -> list[str]:
    latencies = [m.mean_per_token_latency_s, m.p95_per_token_latency_s, m.mean_ttft_s]
    latencies += [m.p95_ttft_s, m.mean_tpot_s]
    rates = [f"{m.throughput_rps:.3g}", f"{m.throughput_tokens_per_s:.0f}", f"{m.goodput_rps:.3g}"]
    counts = [str(m.num_preemptions), str(m.num_errors)]
    server = f"{m.mean_iteration_ms:.1f} / {m.mean_forward_ms:.1f}"
    batch = f"{m.mean_batch_jobs:.1f} / {m.mean_batch_tokens:.1f}"
    return [label, f"{m.rate_rps:.3g}", *map(ms, latencies), *rates, *counts, server, batch]


def render_summary(args: argparse.Namespace, calibration: Calibration, sweep: Sweep) -> list[str]:
    """fcfs / each policy at the lowest rate where fcfs reaches knee-factor x unloaded."""
    fcfs_label = next((v.label for v in args.variants if v.is_plain_fcfs), None)
    fcfs_runs = sweep.results.get(fcfs_label or "")
    if not fcfs_runs:
        return ["fcfs was not run, so there is nothing to compare against."]
    threshold_s = args.knee_factor * calibration.unloaded_per_token_latency_s
    knee = metrics.knee_rate(
        [(m.rate_rps, m.mean_per_token_latency_s) for m in fcfs_runs], threshold_s
    )
    if knee is None:
        knee = max(sweep.rates)
        lines = [
            f"fcfs never reached {args.knee_factor:g}x its unloaded per-token latency "
            f"({ms(threshold_s)} ms); comparing at the highest rate, {knee:.3g} req/s:"
        ]
    else:
        lines = [
            f"The lowest rate where fcfs mean per-token latency is at least {args.knee_factor:g}x "
            f"its unloaded value ({ms(threshold_s)} ms) is **{knee:.3g} req/s**. There, fcfs / "
            "each policy (above 1x: the policy is faster than fcfs):"
        ]
    index = sweep.rates.index(knee)
    base = fcfs_runs[index]
    columns = ["policy", "mean per-token", "P95 per-token", "fcfs / policy: mean", "P95"]
    attrs = ["mean_per_token_latency_s", "p95_per_token_latency_s"]
    short = calibration.short_max_output_tokens
    if short is not None:
        columns += [f"short jobs (<= {short} output tokens): mean", "P95"]
        attrs += ["short_mean_per_token_latency_s", "short_p95_per_token_latency_s"]
    rows = []
    for label, runs in sweep.results.items():
        m = runs[index]
        row = [label, ms(m.mean_per_token_latency_s), ms(m.p95_per_token_latency_s)]
        rows.append(row + [ratio(getattr(base, a), getattr(m, a)) for a in attrs])
    return [*lines, "", *table(columns, rows)]


def plot(path: Path, sweep: Sweep, attr: str, title: str, line: tuple[float, str]) -> None:
    """`attr` of every policy against the rate, in ms on a log scale, with a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in sweep.results.items():
        rates = [m.rate_rps for m in runs]
        ax.plot(rates, [1e3 * getattr(m, attr) for m in runs], marker="o", label=label)
    ax.axhline(1e3 * line[0], color="grey", linestyle=":", label=line[1])
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("ms per output token")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Multi-turn chat: FastServe with its prefix cache and without it, no peer.
    if (code := multiturn.handoff(argv, "bench.policies", peer="none")) is not None:
        if code:
            raise SystemExit(code)
        return
    args = parse_args(argv)
    started = time.perf_counter()
    model = tiny_llama_dir() if args.model == "tiny" else args.model
    calibration, sweep = sweep_policies(args, model)
    elapsed_s = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    report = render_report(args, calibration, sweep, elapsed_s)
    (args.out / f"{args.name}.md").write_text(report)
    unloaded_s = calibration.unloaded_per_token_latency_s
    slo_line = (args.slo_factor * unloaded_s, f"SLO ({args.slo_factor:g}x unloaded)")
    for suffix, attr, line in [
        ("per-token-latency", "mean_per_token_latency_s", (unloaded_s, "unloaded (fcfs)")),
        ("p95", "p95_per_token_latency_s", slo_line),
    ]:
        what = "Mean" if attr.startswith("mean") else "P95"
        title = f"{what} per-token latency ({args.model_label}, {args.dataset}, {args.arrival})"
        plot(args.out / f"{args.name}-{suffix}.png", sweep, attr, title, line)
    print(report)
    print(f"wrote {args.out / args.name}.md and two plots in {elapsed_s:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
