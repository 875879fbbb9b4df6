"""Times the worker's forward step in process and profiles it by op (no gRPC, no scheduler).

    .venv/bin/python -m bench.step_profile [--model SmolLM2-135M-Instruct] [--dtype float32]
        [--threads 2] [--context 64] [--profile-batch 1,16] [--out docs/results/step.md]

Decode steps at batch sizes 1..16 (every job `--context` tokens in), a prefill of 128 tokens and
a mixed step (one 64-token prompt chunk with 15 decodes), each the median of repeated runs; then
torch.profiler's table of the ops of one decode step, by self CPU time. This is the profile
docs/results/engine-cpu.md quotes; run it before and after a change to the forward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from services.common.model_source import DEFAULT_MODEL, load_model, resolve_model
from services.worker.batch import SeqChunk
from services.worker.model_runner import ModelRunner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BLOCK_SIZE = 16


def decode_batch(runner: ModelRunner, batch: int, context: int) -> list[SeqChunk]:
    blocks_per_job = -(-(context + 1) // BLOCK_SIZE)
    return [
        SeqChunk(
            f"d{i}",
            [100 + i],
            context,
            list(range(i * blocks_per_job, (i + 1) * blocks_per_job)),
            True,
        )
        for i in range(batch)
    ]


def prefill(job: str, num_tokens: int, first_block: int, start_pos: int = 0) -> SeqChunk:
    blocks = -(-(start_pos + num_tokens) // BLOCK_SIZE)
    return SeqChunk(
        job,
        [200 + t % 1000 for t in range(num_tokens)],
        start_pos,
        list(range(first_block, first_block + blocks)),
        True,
    )


def median_ms(runner: ModelRunner, seqs: list[SeqChunk], repeats: int) -> float:
    runner.step(seqs)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.step(seqs)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile-batch", default="1,16")
    parser.add_argument("--row-limit", type=int, default=15)
    parser.add_argument("--out", type=Path, help="also write the tables here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(
        resolve_model(args.model), dtype=DTYPES[args.dtype], load_format=args.load_format
    )
    runner = ModelRunner(model, num_blocks=1024, block_size=BLOCK_SIZE)
    lines = [
        f"model {args.model}, {args.dtype}, {args.threads} threads, block size {BLOCK_SIZE}, "
        f"decodes at context {args.context}",
        "",
        "| step | median ms |",
        "| --- | --- |",
    ]
    for batch in (1, 2, 4, 8, 16):
        ms = median_ms(runner, decode_batch(runner, batch, args.context), args.repeats)
        lines.append(f"| decode x{batch} | {ms:.2f} |")
    ms = median_ms(runner, [prefill("p", 128, 900)], max(3, args.repeats // 3))
    lines.append(f"| prefill 128 tokens | {ms:.2f} |")
    mixed = [prefill("p", 64, 900, start_pos=64), *decode_batch(runner, 15, args.context)]
    ms = median_ms(runner, mixed, max(3, args.repeats // 3))
    lines.append(f"| 64-token chunk at position 64 + 15 decodes | {ms:.2f} |")
    for batch in (int(b) for b in args.profile_batch.split(",")):
        seqs = decode_batch(runner, batch, args.context)
        runner.step(seqs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                runner.step(seqs)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.row_limit)
        lines += ["", f"Ops of 5 decode steps at batch {batch}, by self CPU time:", "", "```"]
        lines += [line for line in table.splitlines() if line.strip()]
        lines.append("```")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
