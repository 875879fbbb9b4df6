"""Proactive vs reactive swapping vs recompute, under memory pressure, side by side in one run.

The same workload (same seed, same arrival times) replays against one `fastserve up` per KV
policy, with the device KV pool capped by `--kv-blocks` so that preempted jobs must give up their
blocks. Reports mean and P95 per-token latency (job latency / output tokens, the paper's metric)
and TTFT, and the scheduler's swap and recompute counters, then the ratios recompute / proactive
and reactive / proactive. Usage:

    .venv/bin/python -m bench.kv_policies --model SmolLM2-135M-Instruct --kv-blocks 48 \\
        --rate 1.0 --num-requests 40 [--out docs/results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import loadgen, workload
from bench.metrics import summarize
from testing.stack import Stack
from testing.tiny_model import tiny_llama_dir

KV_POLICIES = ("proactive", "reactive", "recompute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--kv-blocks", type=int, default=48)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--rate", type=float, default=1.0, help="requests/s")
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--dataset", default="alpaca")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write a Markdown report here")
    args = parser.parse_args()
    model = tiny_llama_dir() if args.model == "tiny" else args.model
    requests = workload.make_workload(
        args.num_requests, args.rate, dataset=args.dataset, scale=args.scale,
        max_context_tokens=args.kv_blocks * 16 // 2, seed=args.seed,
    )  # fmt: skip
    rows = []
    results = {}
    for kv_policy in KV_POLICIES:
        stack = Stack.start(
            model, "--kv-blocks", str(args.kv_blocks), "--max-batch-size",
            str(args.max_batch_size), "--kv-policy", kv_policy,
        )  # fmt: skip
        try:
            started = time.perf_counter()
            records = loadgen.run_replay(stack.address, requests)
            elapsed = time.perf_counter() - started
            stats = stack.scheduler_stats()
        finally:
            stack.stop()
        m = summarize(records, args.rate, slo_s=float("inf"))
        results[kv_policy] = m
        rows.append(
            f"| {kv_policy} | {1000 * m.mean_per_token_latency_s:.1f} | "
            f"{1000 * m.p95_per_token_latency_s:.1f} | {1000 * m.mean_ttft_s:.0f} | "
            f"{m.throughput_tokens_per_s:.0f} | {stats['swapped_out_jobs']:.0f} | "
            f"{stats['recomputed_jobs']:.0f} | {m.num_errors} | {elapsed:.0f} |"
        )
        print(rows[-1], flush=True)
    lines = [
        f"# KV policies under memory pressure: {args.model}",
        "",
        f"{args.num_requests} {args.dataset}-shaped requests (scale {args.scale}) at "
        f"{args.rate} req/s, Poisson, seed {args.seed}; `--kv-blocks {args.kv_blocks}` "
        f"(blocks of 16 tokens), `--max-batch-size {args.max_batch_size}`, skip-join MLFQ.",
        "",
        "| kv policy | mean per-token ms | P95 per-token ms | mean TTFT ms | output tok/s "
        "| swap-outs | recomputes | errors | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]
    base = results["proactive"]
    for other in ("recompute", "reactive"):
        m = results[other]
        lines.append(
            f"- {other} / proactive: mean "
            f"{m.mean_per_token_latency_s / base.mean_per_token_latency_s:.2f}x, P95 "
            f"{m.p95_per_token_latency_s / base.p95_per_token_latency_s:.2f}x"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"kv-policies-{Path(str(args.model)).name}.md"
        (args.out / name).write_text(report)


if __name__ == "__main__":
    main()
