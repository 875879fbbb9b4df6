"""The stack steps of `bench.gpu_check`: `fastserve up` at the issue's shapes (throughput, latency,
the control plane's share of an iteration), and the tiny model's exactness through preemption
and swaps against transformers."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.gpu_check_common import Result, cuda_mode
from bench.gpu_check_decode import SHAPES, VOCAB

# The stack runs: (shape, concurrent requests, prompt tokens, output tokens).
STACK_RUNS = {
    "stack-1b": ("1B", 64, 128, 128),
    "stack-8b": ("8B", 16, 128, 128),
    "stack-tiny": ("tiny", 8, 16, 16),
}


def stack_model_dir(shape: str, scratch: Path) -> Path:
    """The tiny model's folder with its config in the given shape (vocabulary 8,192), served with
    --load-format dummy: random weights, the tiny's tokenizer (its weight files are ignored)."""
    from testing.tiny_model import tiny_llama_variant

    return tiny_llama_variant(
        scratch / f"model-{shape}", vocab_size=VOCAB, max_position_embeddings=2048, **SHAPES[shape]
    )


async def burst(
    url: str, prompts: list[list[int]], max_tokens: int, timeout_s: float
) -> list[Result]:
    """Every prompt at once over streamed /v1/completions (token-id prompts: the vocabulary of
    the shaped models is smaller than the tokenizer's); one record per request."""
    import aiohttp

    start = time.perf_counter()

    async def one(session: aiohttp.ClientSession, prompt: list[int]) -> Result:
        record: Result = {"sent": time.perf_counter() - start, "first": None, "tokens": 0}
        body = {
            "model": "",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        try:
            async with session.post(f"{url}/v1/completions", json=body) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
                async for raw in response.content:
                    line = raw.strip()
                    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if chunk.get("choices") and record["first"] is None:
                        record["first"] = time.perf_counter() - start
                    if chunk.get("usage"):
                        record["tokens"] = chunk["usage"]["completion_tokens"]
        except Exception as error:  # one failure is counted, not raised
            record["error"] = f"{type(error).__name__}: {error}"
        record["end"] = time.perf_counter() - start
        return record

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        return list(await asyncio.gather(*(one(session, p) for p in prompts)))


def step_stack(args: argparse.Namespace) -> Result:
    import random

    from testing.stack import Stack, free_port

    gpu = cuda_mode(args)
    shape, concurrency, prompt_tokens, output_tokens = STACK_RUNS[args.step]
    flags = ["--max-batch-size", str(max(concurrency, 1)), "--policy", "fcfs"]
    if gpu:
        flags += ["--device", "cuda", "--dtype", "bfloat16", "--kv-bytes", str(4 << 30)]
    else:
        flags += ["--dtype", "float32"]
    flags += ["--load-format", "dummy"]
    http_port = free_port()
    flags += ["--http-port", str(http_port)]
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, VOCAB) for _ in range(prompt_tokens)] for _ in range(concurrency)
    ]
    with tempfile.TemporaryDirectory() as scratch:
        model = stack_model_dir(shape, Path(scratch))
        started = time.perf_counter()
        stack = Stack.start(model, *flags)
        ready_s = time.perf_counter() - started
        url = f"http://127.0.0.1:{http_port}"
        try:
            asyncio.run(burst(url, [prompts[0][:8]], 4, 120))  # warm-up, not counted
            records = asyncio.run(burst(url, prompts, output_tokens, 600))
            stats = stack.scheduler_stats()
        finally:
            code = stack.stop()
    errors = [r["error"] for r in records if "error" in r]
    good = [r for r in records if "error" not in r and r["first"] is not None]
    tokens = sum(r["tokens"] for r in good)
    span = max(r["end"] for r in records) - min(r["sent"] for r in records)
    ttft = [r["first"] - r["sent"] for r in good]
    per_token = [(r["end"] - r["sent"]) / r["tokens"] for r in good if r["tokens"]]
    tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in good if r["tokens"] > 1]
    iteration = stats["mean_iteration_seconds"]
    forward = stats["mean_forward_seconds"]
    share = (iteration - forward) / iteration if iteration > 0 else None
    result: Result = {
        "shape": shape,
        "concurrency": concurrency,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "flags": flags,
        "ready_s": ready_s,
        "requests": len(records),
        "errors": len(errors),
        "first_errors": errors[:3],
        "output_tokens_total": tokens,
        "output_tokens_per_s": tokens / span if span > 0 else 0.0,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "per_token_latency_mean_s": statistics.fmean(per_token) if per_token else None,
        "tpot_mean_s": statistics.fmean(tpot) if tpot else None,
        "mean_iteration_seconds": iteration,
        "mean_forward_seconds": forward,
        "control_plane_share": share,
        "stack_exit_code": code,
    }
    expected = concurrency * output_tokens
    ok = not errors and tokens == expected and code == 0
    result["status"] = "ok" if ok else "failed"
    if not ok:
        result["reason"] = (
            f"{len(errors)} errors, {tokens}/{expected} tokens, stack exit code {code}"
        )
    share_text = "n/a" if share is None else f"{100 * share:.0f}%"
    result["summary"] = (
        f"{shape}, {concurrency} x {output_tokens}: {result['output_tokens_per_s']:.0f} tok/s, "
        f"TTFT mean {result['ttft_mean_s'] or 0:.3f} s, iteration {1e3 * iteration:.1f} ms, "
        f"forward {1e3 * forward:.1f} ms, control plane {share_text}, ready {ready_s:.0f} s"
    )
    return result


def step_exactness(args: argparse.Namespace) -> Result:
    import torch

    from services.common.model_source import load_model, load_tokenizer, resolve_model
    from services.frontend.tokenizer import encode_prompt
    from testing.oracle import assert_greedy_matches, hf_greedy
    from testing.stack import Stack
    from testing.swap_workload import LENGTHS, PRESSURE, PROMPTS, run_all
    from testing.tiny_model import tiny_llama_dir

    device = "cuda" if cuda_mode(args) else "cpu"
    model_dir = tiny_llama_dir()
    # The e2e swap test's workload: jobs swap out and back in many times, proactively.
    stack = Stack.start(
        model_dir, *PRESSURE, "--kv-policy", "proactive", "--device", device, "--dtype", "float32"
    )
    try:
        outputs = run_all(stack)
        stats = stack.wait_until_idle()
    finally:
        code = stack.stop()
    source = resolve_model(str(model_dir))
    reference = load_model(source, dtype=torch.float32)  # transformers on the CPU
    tokenizer = load_tokenizer(source)
    exact, near_tie, mismatches = 0, 0, []
    for i, tokens in enumerate(outputs):
        prompt_ids = encode_prompt(tokenizer, PROMPTS[i])
        ref = hf_greedy(reference, prompt_ids, LENGTHS[i])
        if tokens == ref:
            exact += 1
            continue
        try:
            assert_greedy_matches(reference, prompt_ids, tokens, ref)
            near_tie += 1
        except AssertionError as error:
            mismatches.append(str(error).splitlines()[0])
    counters = {
        name: stats.series[name][0][1]
        for name in (
            "swapped_out_jobs",
            "swapped_in_jobs",
            "swap_failures",
            "recomputed_jobs",
            "preemptions",
        )
        if stats.series.get(name)
    }
    swaps_in = counters.get("swapped_in_jobs", 0)
    ok = not mismatches and code == 0 and swaps_in > 0 and not counters.get("swap_failures")
    result: Result = {
        "status": "ok" if ok else "failed",
        "device": device,
        "requests": len(outputs),
        "exact": exact,
        "near_tie": near_tie,
        "mismatches": mismatches,
        "counters": counters,
        "stack_exit_code": code,
        "summary": (
            f"{exact}/{len(outputs)} token-identical, {near_tie} at a near-tie, "
            f"{len(mismatches)} mismatched; {swaps_in:.0f} swap-ins, "
            f"{counters.get('preemptions', 0):.0f} preemptions"
        ),
    }
    if not ok:
        result["reason"] = (
            f"{len(mismatches)} mismatches, {swaps_in:.0f} swap-ins, "
            f"{counters.get('swap_failures', 0):.0f} swap failures, exit code {code}"
        )
    return result
