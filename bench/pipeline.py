"""Pipeline stages side by side in one run: decode throughput, per-iteration time and each
stage's idle fraction (the bubble) for S = 1, 2, ... on the same machine and workload.

Every stack gets the same CPU threads in all (`--threads-total`, split evenly over its
stages), so the comparison is of layouts, not of core counts. The workload is a burst of
identical requests with fixed output lengths (EOS ignored), so the batch stays full. Usage:

    .venv/bin/python -m bench.pipeline --model SmolLM2-135M-Instruct --stages 1 2 \\
        [--num-requests 16 --output-tokens 64 --max-batch-size 8 --out docs/results/pipeline.md]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench import loadgen
from bench.workload import Request
from testing.stack import Stack
from testing.tiny_model import tiny_llama_dir


def measure(model, layout: str, args: argparse.Namespace) -> dict[str, float | list[float]]:
    """`layout`: a number of stages, or layers per stage ("17,13")."""
    split = layout if "," in layout else ""
    stages = len(split.split(",")) if split else int(layout)
    os.environ["FASTSERVE_THREADS"] = str(max(1, args.threads_total // stages))
    stack = Stack.start(
        model, "--stages", str(stages), "--layer-split", split,
        "--max-batch-size", str(args.max_batch_size), "--policy", args.policy,
    )  # fmt: skip
    try:
        prompt = " ".join(["word"] * args.prompt_tokens)
        warm = Request(arrival_s=0.0, prompt=prompt, output_tokens=4)
        loadgen.run_replay(stack.address, [warm] * args.max_batch_size)
        before = stack.scheduler_stats()
        request = Request(arrival_s=0.0, prompt=prompt, output_tokens=args.output_tokens)
        started = time.perf_counter()
        records = loadgen.run_replay(stack.address, [request] * args.num_requests)
        elapsed = time.perf_counter() - started
        after = stack.scheduler_stats()
    finally:
        stack.stop()
    failed = [r.error for r in records if not r.ok]
    if failed:
        raise RuntimeError(f"{layout}: requests failed: {set(failed)}")
    idle = []
    walls = zip(before.per_stage("wall_seconds"), after.per_stage("wall_seconds"), strict=True)
    busies = zip(before.per_stage("busy_seconds"), after.per_stage("busy_seconds"), strict=True)
    for (wall_before, wall_after), (busy_before, busy_after) in zip(walls, busies, strict=True):
        wall = wall_after - wall_before
        idle.append(1 - (busy_after - busy_before) / wall if wall > 0 else 0.0)
    iterations = after["iterations"] - before["iterations"]
    return {
        "tokens_per_s": sum(r.output_tokens for r in records) / elapsed,
        "iteration_ms": 1000 * elapsed / max(1, iterations),
        "round_trip_ms": 1000 * after["mean_iteration_seconds"],
        "forward_ms": 1000 * after["mean_forward_seconds"],
        "idle": idle,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument(
        "--stages", nargs="+", default=["1", "2"], help="stage counts or layer splits (17,13)"
    )
    parser.add_argument("--threads-total", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--policy", default="fcfs")
    parser.add_argument("--out", type=Path, help="write a Markdown report here")
    args = parser.parse_args()
    model = tiny_llama_dir() if args.model == "tiny" else args.model
    results = {s: measure(model, s, args) for s in args.stages}
    base = results[args.stages[0]]
    lines = [
        f"Model {args.model}, {args.num_requests} requests x {args.output_tokens} output tokens "
        f"(prompt ~{args.prompt_tokens}), batch cap {args.max_batch_size}, policy {args.policy}, "
        f"{args.threads_total} CPU threads split over the stages.",
        "",
        "| stages (layers) | decode tokens/s | vs first | wall time per iteration (ms) "
        "| decision round trip (ms) | forward, all stages (ms) | idle fraction per stage |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stages, r in results.items():
        idle = ", ".join(f"{x:.0%}" for x in r["idle"])
        lines.append(
            f"| {stages} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['iteration_ms']:.1f} | "
            f"{r['round_trip_ms']:.1f} | {r['forward_ms']:.1f} | {idle} |"
        )
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
