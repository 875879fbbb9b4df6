"""Iteration time and the share of it spent outside the model forward.

Starts `fastserve up` for each model, keeps N streams decoding with fixed output lengths (EOS
ignored), and reads the scheduler's Stats: mean iteration time (schedule + command round trip +
update + publish) and mean worker forward time, over the same iterations. Also reports decode
throughput seen by clients. Usage:

    .venv/bin/python -m bench.iteration_overhead [--models tiny,SmolLM2-135M-Instruct]
        [--concurrency 1,8,16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from fastserve_client import Client
from testing.stack import Stack
from testing.tiny_model import tiny_llama_dir


def measure(stack: Stack, concurrency: int, max_tokens: int) -> dict[str, float]:
    def one(i: int) -> int:
        with Client(stack.address) as client:
            prompt = f"Request {i}: write a long story about a lighthouse keeper."
            result = client.complete(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
            return result.usage.completion_tokens

    # Warm-up, then reset the window by running enough iterations to fill it with this load.
    one(-1)
    before = stack.scheduler_stats()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(concurrency)))
    elapsed = time.perf_counter() - started
    after = stack.scheduler_stats()
    iterations = after["iterations"] - before["iterations"]
    return {
        "iterations": iterations,
        "iteration_ms": 1000 * after["mean_iteration_seconds"],
        "forward_ms": 1000 * after["mean_forward_seconds"],
        "outside_share": 1 - after["mean_forward_seconds"] / after["mean_iteration_seconds"],
        "tokens_per_s": tokens / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", default="1,8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    print("| model | streams | iteration ms | forward ms | outside forward | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        model = tiny_llama_dir() if name == "tiny" else name
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            # A fresh stack per row: the Stats means cover a window of the last 1000 iterations.
            stack = Stack.start(model, "--max-batch-size", str(max(concurrency, 1)))
            try:
                r = measure(stack, concurrency, args.max_tokens)
            finally:
                stack.stop()
            print(
                f"| {name} | {concurrency} | {r['iteration_ms']:.2f} | {r['forward_ms']:.2f} | "
                f"{100 * r['outside_share']:.0f}% | {r['tokens_per_s']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
