"""Discrete-event simulator: the scheduler's real pure core (policies, batch formation, KV
blocks) driven by a cost model instead of a worker, on the policy benchmark's workloads.

Each iteration takes the time the cost model gives for the batch the core formed; arrivals
between iterations are admitted before the next `schedule()`, as the engine does. Runs in
seconds where the real stack takes minutes, so a policy change can be tried on many seeds and
rates before `bench/policies.py` checks it on the real processes. The cost model is linear, fitted
to measurements (docs/results/iteration-overhead.md, the profiler's tables):

    iteration = base + per_decode * decodes + per_prefill_token * prefill tokens
                + per_context_token * decodes * longest decode context (padded attention)

Usage: .venv/bin/python -m bench.simulate [--model smollm2] [--dataset sharegpt --scale 0.1]
           [--rates 2,3,6] [--num-requests 200] [--seeds 0,1,2] [--num-blocks 40]
           [--kv-policy proactive] [--policies fcfs@recompute skip-join-mlfq gittins]

Besides the scheduler's policies, `gittins` (bench/gittins.py) orders by the Gittins index of
the workload's output-length distribution: the best order that does not know each job's length.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench import workload
from bench.gittins import GittinsPolicy, gittins_indices
from bench.variants import Variant, parse_variant
from services.scheduler.core import Job, SchedulerConfig, SchedulerCore
from services.scheduler.core.config import KV_POLICIES
from services.scheduler.core.decision import Decision, EventKind, SwapResult
from services.scheduler.core.policies import make_policy
from services.scheduler.core.policy import Policy
from services.scheduler.core.profile import PerformanceProfile


@dataclass(frozen=True, slots=True)
class CostModel:
    base_s: float  # fixed cost of an iteration (weights streamed once, launch overheads)
    per_decode_s: float  # each decoding job
    per_prefill_token_s: float  # each prompt token
    per_context_token_s: float  # attention: decodes x longest decode context, padded

    def iteration_s(self, decision: Decision) -> float:
        decodes = [c for c in decision.chunks if len(c.token_ids) == 1]
        prefill_tokens = sum(len(c.token_ids) for c in decision.chunks if len(c.token_ids) > 1)
        longest = max((c.start_pos + 1 for c in decodes), default=0)
        return (
            self.base_s
            + self.per_decode_s * len(decodes)
            + self.per_prefill_token_s * prefill_tokens
            + self.per_context_token_s * len(decodes) * longest
        )

    def profile(self, max_batch_size: int) -> PerformanceProfile:
        """What the start-up profiler would measure on this cost model."""
        prefill = tuple(
            (n, self.base_s + self.per_prefill_token_s * n) for n in (1, 16, 64, 256, 1024)
        )
        sizes = sorted({1, 2, 4, 8, max_batch_size})
        decode = tuple((b, self.base_s + self.per_decode_s * b) for b in sizes)
        return PerformanceProfile(prefill_s=prefill, decode_s=decode)


MODELS = {
    # SmolLM2-135M on the 2-core VM: 54 ms alone, 93 ms at 16 decodes, ~4 ms a prompt token.
    "smollm2": (CostModel(0.051, 0.0026, 0.004, 0.0000015), 8192),
    # The tiny test model: iteration overhead dominates (4 ms alone, 6.5 ms at 16).
    "tiny": (CostModel(0.0038, 0.00017, 0.00002, 0.0), 512),
    # The tiny model as the live stack ran it on 2026-12-02 (11.5 ms a token unloaded, 18-20 ms a
    # step under memory pressure): a rough fit, for the starvation sweep in
    # docs/results/scheduling-smollm2.md.
    "tiny-live": (CostModel(0.009, 0.00055, 0.00005, 0.0), 512),
    # SmolLM2-135M as the live stack ran it on 2026-12-02 with a 25-block pool (profile: a lone
    # decode 142 ms, 8 decodes 280 ms; prefill 146 / 294 / 529 ms for 1 / 16 / 64 tokens). On
    # the live benchmark's seed-0 workload at 1.2 req/s it gives fcfs@recompute 1353 ms a token
    # (live 1434), skip-join-mlfq@recompute 901 (827) and @proactive 734 (809).
    "smollm2-live": (CostModel(0.125, 0.019, 0.0065, 0.0), 8192),
}


GITTINS_SAMPLE, GITTINS_SEED = 10_000, 1_000_003


@dataclass(frozen=True, slots=True)
class Outcome:
    per_token_s: list[float]  # job latency / output tokens, per request
    makespan_s: float


def simulate(
    requests: list[workload.Request],
    policy: str,
    options: dict[str, str],
    cost: CostModel,
    *,
    max_model_len: int,
    max_batch_size: int = 16,
    max_batched_tokens: int = 2048,
    num_blocks: int = 100_000,
    kv_policy: str = "recompute",
    block_bytes: int = 737_280,  # SmolLM2-135M: 30 layers x K/V x 16 tokens x 3 heads x 64, f32
    swap_bytes_per_s: float = 2e9,
    gittins: Sequence[float] = (),
) -> Outcome:
    """Replays `requests`; with kv_policy "proactive" or "reactive" a swap finishes by the next
    iteration and adds its copy time (bytes / swap_bytes_per_s) to the one it was sent in: on
    a CPU the copy shares the cores with the model. Policy "gittins" (simulator only) orders by
    the index table `gittins` (bench/gittins.py)."""
    clock = [0.0]
    config = SchedulerConfig(
        num_blocks=num_blocks,
        block_size=16,
        max_model_len=max_model_len,
        max_batch_size=max_batch_size,
        max_batched_tokens=max_batched_tokens,
        kv_policy=kv_policy,
        swap_enabled=kv_policy != "recompute",
        reserve_blocks=num_blocks // 20 if kv_policy == "proactive" else 0,
        block_bytes=block_bytes,
    )
    profile = cost.profile(max_batch_size)
    ordering: Policy
    if policy == "gittins":
        ordering = GittinsPolicy(gittins)
    else:
        ordering = make_policy(
            policy, options, profile, max_model_len=max_model_len, max_batch_size=max_batch_size
        )
    core = SchedulerCore(
        config,
        ordering,
        clock=lambda: clock[0],
        profile=profile,
    )
    arrivals = sorted(requests, key=lambda r: r.arrival_s)
    arrived_at: dict[str, float] = {}
    finished_at: dict[str, float] = {}
    next_arrival = 0
    while len(finished_at) < len(arrivals):
        if not core.has_work() and next_arrival < len(arrivals):
            clock[0] = max(clock[0], arrivals[next_arrival].arrival_s)
        while next_arrival < len(arrivals) and arrivals[next_arrival].arrival_s <= clock[0]:
            request = arrivals[next_arrival]
            job_id = f"r{next_arrival}"
            prompt = [5] * max(1, request.num_prompt_words)
            core.add_job(Job(job_id, prompt, request.output_tokens, ignore_eos=True))
            arrived_at[job_id] = request.arrival_s
            next_arrival += 1
        decision = core.schedule()
        moves = [(m, False) for m in decision.swap_out] + [(m, True) for m in decision.swap_in]
        swap_s = sum(len(m.block_ids) * block_bytes for m, _ in moves) / swap_bytes_per_s
        clock[0] += (cost.iteration_s(decision) if decision.chunks else 0.001) + swap_s
        swaps = [
            SwapResult(m.job_id, swap_in, True, len(m.block_ids) * block_bytes, swap_s)
            for m, swap_in in moves
        ]
        sampled = {c.job_id: 7 for c in decision.chunks if c.sample}
        for event in core.update(decision, sampled, swaps):
            if event.kind is EventKind.FINISHED:
                finished_at[event.job_id] = clock[0]
    per_token = [
        (finished_at[f"r{index}"] - arrived_at[f"r{index}"]) / request.output_tokens
        for index, request in enumerate(arrivals)
    ]
    return Outcome(per_token, clock[0])


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


@dataclass(frozen=True, slots=True)
class Knee:
    """One seed's knee: the lowest rate where the baseline (the first variant) reaches
    `factor` x its unloaded per-token latency, and each variant's ratio there."""

    seed: int
    rate: float
    baseline_over_unloaded: float
    ratios: dict[str, tuple[float, float]]  # label -> baseline / variant, mean and P95


def find_knee(
    run: Callable[[list[workload.Request], Variant], Outcome],
    make_requests: Callable[[float], list[workload.Request]],
    variants: list[Variant],
    rates: list[float],
    factor: float,
    seed: int,
) -> Knee | None:
    """As bench/policies.py summarises a live sweep: unloaded = the baseline serving eight
    requests one at a time (1,000 s apart); None when no rate reaches the knee."""
    unloaded = statistics.mean(run(make_requests(0.001)[:8], variants[0]).per_token_s)
    for rate in rates:
        requests = make_requests(rate)
        base = run(requests, variants[0])
        base_mean, base_p95 = statistics.mean(base.per_token_s), p95(base.per_token_s)
        if base_mean < factor * unloaded:
            continue
        ratios = {}
        for variant in variants[1:]:
            outcome = run(requests, variant)
            mean, tail = statistics.mean(outcome.per_token_s), p95(outcome.per_token_s)
            ratios[variant.label] = (base_mean / mean, base_p95 / tail)
        return Knee(seed, rate, base_mean / unloaded, ratios)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--dataset", default="sharegpt")
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--rates", default="2,3,4,6")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=100_000, help="KV blocks of 16 tokens")
    parser.add_argument(
        "--kv-policy", choices=KV_POLICIES, default="proactive", help="unless a variant says @"
    )
    parser.add_argument(
        "--policies", nargs="+", default=["fcfs", "skip-join-mlfq", "mlfq", "srpt-oracle"]
    )
    parser.add_argument(
        "--knee-factor", type=float, default=None,
        help="per seed, report the ratios at the lowest rate where the first policy reaches "
        "this many times its unloaded per-token latency (issue 3's measure: 5)",
    )  # fmt: skip
    args = parser.parse_args()
    cost, max_model_len = MODELS[args.model]
    variants = [parse_variant(spec) for spec in args.policies]
    rates = [float(r) for r in args.rates.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    # The Gittins policy knows the distribution of output lengths, not each job's: its index
    # table comes from 10,000 requests of the same generator under another seed.
    indices: list[float] = []
    if any(variant.policy == "gittins" for variant in variants):
        sample = workload.make_workload(
            GITTINS_SAMPLE, 1.0, dataset=args.dataset, scale=args.scale,
            max_context_tokens=max_model_len, seed=GITTINS_SEED,
        )  # fmt: skip
        indices = gittins_indices(r.output_tokens for r in sample)

    def run(requests: list[workload.Request], variant: Variant) -> Outcome:
        return simulate(
            requests, variant.policy, dict(variant.options), cost,
            max_model_len=max_model_len, max_batch_size=args.max_batch_size,
            num_blocks=args.num_blocks, kv_policy=variant.kv_policy or args.kv_policy,
            gittins=indices,
        )  # fmt: skip

    def requests_for(seed: int) -> Callable[[float], list[workload.Request]]:
        return lambda rate: workload.make_workload(
            args.num_requests, rate, dataset=args.dataset, scale=args.scale,
            max_context_tokens=max_model_len, seed=seed,
        )  # fmt: skip

    print(
        f"model {args.model}, {args.dataset} x{args.scale}, {args.num_requests} requests, "
        f"seeds {args.seeds}; per-token latency ms (mean / P95), first policy / it in brackets"
    )
    if args.knee_factor is not None:
        knees = []
        for seed in seeds:
            knee = find_knee(run, requests_for(seed), variants, rates, args.knee_factor, seed)
            if knee is None:
                print(f"seed {seed}: no rate reaches {args.knee_factor:g}x unloaded")
                continue
            knees.append(knee)
            cells = " | ".join(f"{k} {m:.2f}x/{t:.2f}x" for k, (m, t) in knee.ratios.items())
            print(f"seed {seed}: knee {knee.rate:g} ({knee.baseline_over_unloaded:.1f}x): {cells}")
        if not knees:
            return
        for variant in variants[1:]:
            means = [knee.ratios[variant.label][0] for knee in knees]
            tails = [knee.ratios[variant.label][1] for knee in knees]
            print(
                f"{variant.label}: mean {statistics.mean(means):.2f}x (min {min(means):.2f}x, "
                f">= 2x on {sum(m >= 2 for m in means)} of {len(means)}), "
                f"P95 {statistics.mean(tails):.2f}x (min {min(tails):.2f}x)"
            )
        return
    for rate in rates:
        results: dict[str, list[Outcome]] = {}
        for seed in seeds:
            requests = requests_for(seed)(rate)
            for variant in variants:
                results.setdefault(variant.label, []).append(run(requests, variant))
        base = results[variants[0].label]
        base_mean = statistics.mean(statistics.mean(o.per_token_s) for o in base)
        base_p95 = statistics.mean(p95(o.per_token_s) for o in base)
        cells = []
        for label, outcomes in results.items():
            mean = statistics.mean(statistics.mean(o.per_token_s) for o in outcomes)
            tail = statistics.mean(p95(o.per_token_s) for o in outcomes)
            cells.append(
                f"{label} {mean * 1e3:.0f}/{tail * 1e3:.0f} "
                f"({base_mean / mean:.2f}x/{base_p95 / tail:.2f}x)"
            )
        print(f"rate {rate:g}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
