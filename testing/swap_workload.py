"""A workload that keeps the KV of most jobs moving between the device and the kvstore: the swap
exactness checks of the e2e tests and of `make gpu-check` run it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fastserve_client import Client
from testing.stack import Stack

# 12 blocks of 16 tokens for 10 jobs of up to ~90 tokens each, 3 at a time: most jobs are
# swapped out and back in several times. Swap cost 0: always swap rather than recompute.
PRESSURE = ("--kv-blocks", "12", "--max-batch-size", "3", "--swap-cost-scale", "0",
            "--reserve-blocks", "2")  # fmt: skip
PROMPTS = [f"Request {i}: " + "describe the sea in many words " * (1 + i % 4) for i in range(10)]
LENGTHS = [10 + 6 * (i % 4) for i in range(10)]


def run_all(stack: Stack, pause=None) -> list[list[int]]:
    def one(i):
        with Client(stack.address, timeout=300) as client:
            result = client.complete(
                PROMPTS[i], max_tokens=LENGTHS[i], temperature=0, ignore_eos=True
            )
            return result.token_ids

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(one, i) for i in range(len(PROMPTS))]
        if pause is not None:
            pause()
        return [f.result() for f in futures]
