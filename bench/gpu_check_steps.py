"""The steps of `bench.gpu_check`, each run as its own process under its own time limit:

    .venv/bin/python -m bench.gpu_check_steps STEP --device cpu|cuda [--quick] --result FILE

A step writes one JSON object to FILE: `status` (ok, failed or skipped), `reason` where it did
not pass, `summary` (one line for the report's table) and its numbers. It never decides what
the report says about the issue's targets: bench/gpu_check.py does.

Steps: env (versions, device), gpu-tests (`pytest -m gpu`), decode (one decode step of our
engine vs transformers eager, and the bound), stack-1b / stack-8b / stack-tiny (the whole
stack's throughput and latency, and the scheduler's iteration vs forward time), exactness
(float32 tiny model through preemption and swaps, compared with transformers), swap (the
worker's swap path vs plain pinned copies), nccl (two pipeline stages over NCCL, two GPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
Result = dict[str, Any]

VOCAB = 8192
WARMUP = 5  # steps before timing (the first few pack weights, pick kernels)
BLOCK_SIZE = 16
# The shapes: Llama-3.2-1B and Llama-3-8B, vocabulary 8,192; `tiny` is the test model's.
SHAPES: dict[str, dict[str, int]] = {
    "1B": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
    ),
    "8B": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=768,
    ),
}
# The stack runs: (shape, concurrent requests, prompt tokens, output tokens).
STACK_RUNS = {
    "stack-1b": ("1B", 64, 128, 128),
    "stack-8b": ("8B", 16, 128, 128),
    "stack-tiny": ("tiny", 8, 16, 16),
}
# The wheels an offline GPU machine needs beyond torch and transformers (pip name, version).
WHEELS = {
    "grpcio": "1.85.1",
    "grpcio-health-checking": "1.85.1",
    "grpcio-reflection": "1.85.1",
    "protobuf": ">=7.35.1",
    "redis": "any",
    "prometheus_client": "any",
}


def cuda_mode(args: argparse.Namespace) -> bool:
    return bool(args.device == "cuda")


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- env


def step_env(args: argparse.Namespace) -> Result:
    from importlib import metadata

    import torch

    wheels = {}
    for name in [*WHEELS, "transformers", "pytest", "aiohttp"]:
        try:
            wheels[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            wheels[name] = None
    try:
        import fastserve.v1.generation_pb2  # noqa: F401

        generated = True
    except ImportError:
        generated = False
    info: Result = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "wheels": wheels,
        "generated_code": generated,
    }
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        info["dirty"] = bool(dirty)
    except OSError:
        info["commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device_name"] = props.name
        info["device_memory_gib"] = round(props.total_memory / (1 << 30), 1)
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    missing = [name for name in WHEELS if wheels.get(name) is None]
    status = "ok" if generated and not missing else "failed"
    reason = ""
    if not generated:
        reason += "no generated code (run `make proto`). "
    if missing:
        reason += f"missing wheels: {', '.join(missing)}"
    name = info.get("device_name") or "CPU"
    return {
        "status": status,
        "reason": reason.strip(),
        "summary": f"torch {torch.__version__}, CUDA {torch.version.cuda}, {name}",
        **info,
    }


# -- gpu-tests


def gpu_test_files() -> list[str]:
    """Test files that use the gpu marker (collecting only these keeps the step fast)."""
    return sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("test_*.py")
        if "mark.gpu" in path.read_text(errors="replace")
    )


def step_gpu_tests(args: argparse.Namespace) -> Result:
    files = gpu_test_files()
    if not files:
        return {"status": "failed", "reason": "no test file uses the gpu marker", "summary": ""}
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "junit.xml"
        argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
        argv += [f"--junitxml={junit}", *files]
        completed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        print(completed.stdout[-4000:], completed.stderr[-2000:], sep="\n")
        if not junit.is_file():
            return {"status": "failed", "reason": f"pytest exited {completed.returncode}"}
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        skip_reasons = sorted(
            {
                node.get("message", "")
                for node in suite.iter("skipped")
                if node.get("message") is not None
            }
        )
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = completed.returncode == 0 and counts["failures"] == counts["errors"] == 0
    summary = (
        f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped"
    )
    return {
        "status": "ok" if ok else "failed",
        "reason": "" if ok else f"pytest exited {completed.returncode}",
        "summary": summary,
        "files": files,
        "passed": passed,
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "skip_reasons": skip_reasons,
        "returncode": completed.returncode,
    }


# -- decode


def copy_bandwidth(device: str, nbytes: int, repeats: int) -> float:
    """Bytes read plus bytes written per second by one large copy on `device` (device to device
    on a GPU, a memcpy between two host tensors on CPU), median of `repeats`."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - started)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def llama_config(shape: str, max_positions: int) -> Any:
    from testing.tiny_model import tiny_llama_config

    return tiny_llama_config(VOCAB, **SHAPES[shape], max_position_embeddings=max_positions)


def median_seconds(run: Callable[[], object], warmup: int, repeats: int, rounds: int = 3) -> float:
    """The lowest of `rounds` medians of `repeats` timed runs each, after `warmup` runs: a
    stall that other processes cause in one round (a shared machine) does not count."""
    for _ in range(warmup):
        run()
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        medians.append(statistics.median(times))
    return min(medians)


def decode_rows(
    shape: str, batches: list[int], context: int, device: str, dtype: Any, repeats: int
) -> list[Result]:
    """One decode step at each batch size: ours (ModelRunner on the paged pool) and transformers
    eager (its default attention, a DynamicCache of `context` tokens), on the same weights,
    drawn on the device."""
    import torch
    from transformers import AutoModelForCausalLM

    config = llama_config(shape, max(2048, 2 * context))
    torch.manual_seed(0)
    with torch.device(device):  # weights drawn on the device, not on the CPU then moved
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if next(hf.parameters()).device.type != torch.device(device).type:
        raise RuntimeError(f"transformers built its weights on {next(hf.parameters()).device}")
    rows = ours_rows(hf, shape, batches, context, repeats)  # our copy of the weights is freed
    for row in rows:
        row["hf_ms"] = 1e3 * hf_decode_seconds(hf, row["batch"], context, repeats)
    return rows


def ours_rows(hf: Any, shape: str, batches: list[int], context: int, repeats: int) -> list[Result]:
    """Our decode step (a ModelRunner holding a copy of `hf`'s weights) at each batch size."""
    import torch

    from bench.step_profile import decode_batch
    from services.worker.model_runner import ModelRunner

    config = hf.config
    blocks_per_job = -(-(context + 1) // BLOCK_SIZE)
    runner = ModelRunner(hf, num_blocks=max(batches) * blocks_per_job + 1, block_size=BLOCK_SIZE)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    head_dim = config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=runner.kv_cache.dtype).element_size()
    kv_bytes_per_job = (
        context * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * element
    )
    rows = []
    for batch in batches:
        seqs = decode_batch(runner, batch, context)
        ours = median_seconds(lambda seqs=seqs: runner.step(seqs), WARMUP, repeats)
        rows.append(
            {
                "shape": shape,
                "batch": batch,
                "context": context,
                "ours_ms": 1e3 * ours,
                "weight_bytes": weight_bytes,
                "kv_bytes": batch * kv_bytes_per_job,
            }
        )
    return rows


def hf_decode_seconds(hf: Any, batch: int, context: int, repeats: int) -> float:
    """transformers' decode step of `batch` rows after `context` tokens (random KV), greedy
    sampled to the host; the cache is cropped back to `context` after each step."""
    import torch
    from transformers import DynamicCache

    config = hf.config
    param = next(hf.parameters())
    device, dtype = param.device, param.dtype
    kv_heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        k = torch.randn(batch, kv_heads, context, head_dim, device=device, dtype=dtype)
        cache.update(k, torch.randn_like(k), layer)
    ids = torch.randint(100, VOCAB, (batch, 1), device=device)
    positions = torch.full((batch, 1), context, device=device)

    def step() -> None:
        out = hf(
            input_ids=ids,
            past_key_values=cache,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        out.logits[:, -1].argmax(-1).tolist()  # greedy, to the host, as ours does
        cache.crop(-(cache.get_seq_length() - context))

    with torch.inference_mode():
        return median_seconds(step, WARMUP, repeats)


def step_decode(args: argparse.Namespace) -> Result:
    import torch

    gpu = cuda_mode(args)
    if gpu and not torch.cuda.is_available():
        return {"status": "failed", "reason": "--device cuda but CUDA is not available"}
    if gpu and not args.quick:
        shapes, batches, context, dtype = ["1B", "8B"], [1, 16, 64], 512, torch.bfloat16
        copy_bytes, repeats = 1 << 30, 10
    elif gpu:
        shapes, batches, context, dtype = ["1B"], [1, 16], 512, torch.bfloat16
        copy_bytes, repeats = 1 << 28, 5
    else:  # CPU: the tiny test model's shape (and a small one unless --quick), float32
        shapes = ["tiny"] if args.quick else ["tiny", "small"]
        batches, context, dtype = [1, 4], 128, torch.float32
        copy_bytes, repeats = 1 << 26, 10
    device = "cuda" if gpu else "cpu"
    if not gpu:  # one thread: on a shared few-core machine OpenMP barriers stall under load
        torch.set_num_threads(1)
    bandwidth = copy_bandwidth(device, copy_bytes, repeats)
    rows = []
    for shape in shapes:
        started = time.perf_counter()
        rows += decode_rows(shape, batches, context, device, dtype, repeats)
        if gpu:
            torch.cuda.empty_cache()
        print(f"{shape}: {time.perf_counter() - started:.1f} s", flush=True)
    for row in rows:
        row["bound_ms"] = 1e3 * (row["weight_bytes"] + row["kv_bytes"]) / bandwidth
        row["ours_over_bound"] = row["ours_ms"] / row["bound_ms"]
        row["ours_over_hf"] = row["ours_ms"] / row["hf_ms"]
    worst = max(rows, key=lambda r: r["ours_over_bound"])
    return {
        "status": "ok",
        "summary": (
            f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {len(rows)} rows; ours/bound "
            f"{min(r['ours_over_bound'] for r in rows):.1f}x-{worst['ours_over_bound']:.1f}x, "
            f"ours/transformers {min(r['ours_over_hf'] for r in rows):.2f}x-"
            f"{max(r['ours_over_hf'] for r in rows):.2f}x"
        ),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads() if not gpu else None,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "copy_bytes": copy_bytes,
        "repeats": repeats,
        "warmup": WARMUP,
        "rows": rows,
    }


# -- stack


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


# -- exactness


# Ten jobs, three at a time, twelve blocks of 16 tokens: jobs are preempted and swapped out and
# back in many times (tests/e2e/test_swapping.py's workload), swap cost 0 (always swap).
PRESSURE = ("--kv-blocks", "12", "--max-batch-size", "3", "--swap-cost-scale", "0",
            "--reserve-blocks", "2", "--kv-policy", "proactive")  # fmt: skip


def step_exactness(args: argparse.Namespace) -> Result:
    import torch

    from services.common.model_source import load_model, load_tokenizer, resolve_model
    from services.frontend.tokenizer import encode_prompt
    from testing.stack import Stack
    from testing.tiny_model import tiny_llama_dir
    from tests.e2e.test_swapping import LENGTHS, PROMPTS, run_all
    from tests.oracle import assert_greedy_matches, hf_greedy

    device = "cuda" if cuda_mode(args) else "cpu"
    model_dir = tiny_llama_dir()
    stack = Stack.start(model_dir, *PRESSURE, "--device", device, "--dtype", "float32")
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


# -- swap


def step_swap(args: argparse.Namespace) -> Result:
    import torch

    from bench.swap_bandwidth import wait
    from services.worker.kv_cache import KVCache
    from services.worker.swapper import Swapper
    from testing.kvstore_process import start_kvstore, stop_kvstore

    gpu = cuda_mode(args)
    device = "cuda" if gpu else "cpu"
    if gpu:  # the 1B shape's blocks in bfloat16: 16 layers, 8 KV heads of 64 (512 KiB a block)
        layers, heads, dim, dtype = 16, 8, 64, torch.bfloat16
        sizes = [1.0, 4.0, 16.0, 64.0] if not args.quick else [4.0, 16.0]
    else:  # SmolLM2-135M's, float32 (737 KiB)
        layers, heads, dim, dtype = 30, 3, 64, torch.float32
        sizes = [1.0, 4.0]
    rounds = 3 if args.quick or not gpu else 5
    element = torch.empty((), dtype=dtype).element_size()
    block_bytes = layers * 2 * BLOCK_SIZE * heads * dim * element
    num_blocks = int(max(sizes) * (1 << 20) / block_bytes) * 2 + 2
    kvstore = start_kvstore("--capacity-bytes", str(1 << 33), "--log-level", "warning")
    cache = KVCache(
        num_blocks=num_blocks, num_layers=layers, block_size=BLOCK_SIZE, num_kv_heads=heads,
        head_dim=dim, dtype=dtype, device=device,
    )  # fmt: skip
    cache.data.normal_()
    swapper = Swapper(cache, kvstore.address)
    rows = []
    try:
        for size in sizes:
            n = max(1, round(size * (1 << 20) / block_bytes))
            src, dst = list(range(n)), list(range(n, 2 * n))
            nbytes = n * cache.block_bytes
            host = torch.empty((n, *cache.data.shape[1:]), dtype=dtype, pin_memory=gpu)
            host.zero_()
            outs, ins, copy_out, copy_in = [], [], [], []
            for r in range(rounds + 1):  # the first round warms up
                job = f"check-{size}-{r}"
                started = time.perf_counter()
                swapper.swap_out(job, src)
                (done,) = wait(swapper)
                if not done.ok:
                    raise RuntimeError(f"swap-out failed: {done.error}")
                out_s = time.perf_counter() - started
                started = time.perf_counter()
                swapper.swap_in(job, dst)
                (done,) = wait(swapper)
                if not done.ok:
                    raise RuntimeError(f"swap-in failed: {done.error}")
                in_s = time.perf_counter() - started
                if not torch.equal(cache.data[dst], cache.data[src]):
                    raise RuntimeError("swapped-in blocks differ from the swapped-out ones")
                # Plain copies of the same bytes: the pool's first n blocks (contiguous) to and
                # from a host buffer allocated once (pinned on CUDA; on CPU a one-thread memcpy,
                # as bench/swap_bandwidth.py's).
                threads = torch.get_num_threads()
                if not gpu:
                    torch.set_num_threads(1)
                sync(device)
                started = time.perf_counter()
                host.copy_(cache.data[:n])
                sync(device)
                c_out = time.perf_counter() - started
                started = time.perf_counter()
                cache.data[n : 2 * n].copy_(host)
                sync(device)
                c_in = time.perf_counter() - started
                torch.set_num_threads(threads)
                if r:
                    outs.append(out_s)
                    ins.append(in_s)
                    copy_out.append(c_out)
                    copy_in.append(c_in)
            gbps = [nbytes / statistics.median(t) / 1e9 for t in (outs, ins, copy_out, copy_in)]
            rows.append(
                {
                    "mib": nbytes / (1 << 20),
                    "swap_out_gbps": gbps[0],
                    "swap_in_gbps": gbps[1],
                    "copy_out_gbps": gbps[2],
                    "copy_in_gbps": gbps[3],
                    "out_ratio": gbps[0] / gbps[2],
                    "in_ratio": gbps[1] / gbps[3],
                }
            )
            print(rows[-1], flush=True)
    finally:
        swapper.close()
        stop_kvstore(kvstore)
    large = [r for r in rows if r["mib"] >= 4]
    worst = min((min(r["out_ratio"], r["in_ratio"]) for r in large), default=None)
    return {
        "status": "ok",
        "summary": f"{len(rows)} sizes; swaps of >= 4 MiB at {100 * (worst or 0):.0f}% or more "
        f"of the plain {'pinned ' if gpu else ''}copies",
        "device": device,
        "pinned": gpu,
        "block_bytes": block_bytes,
        "rounds": rounds,
        "rows": rows,
        "worst_ratio_at_4mib_or_more": worst,
    }


# -- nccl


def run_two_stages(devices: list[str], backend: str) -> Result:
    """Two pipeline stages in this process (one thread each, as testing/local_pipeline.py runs
    them), each on its own device, activations over `backend`; a shuffling policy preempts at
    every iteration; greedy output compared with transformers on the CPU."""
    import copy

    import torch

    from services.common.model_source import load_model, load_tokenizer, resolve_model
    from services.frontend.tokenizer import encode_prompt
    from services.scheduler.core import Job, SchedulerConfig, SchedulerCore
    from services.worker.executor import Executor
    from services.worker.model_runner import ModelRunner
    from services.worker.pipeline import StageGroup
    from services.worker.stage_layout import split_layers
    from testing.local_pipeline import LocalPipeline
    from testing.stack import free_port
    from testing.tiny_model import tiny_llama_dir
    from tests.oracle import assert_greedy_matches, hf_greedy
    from tests.worker.test_core_with_runner import ShufflingPolicy

    source = resolve_model(str(tiny_llama_dir()))
    reference = load_model(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    block_size, num_blocks = 16, 12
    ranges = split_layers(reference.config.num_hidden_layers, 2)
    rendezvous = f"127.0.0.1:{free_port()}"
    executors = []
    for index, (layers, device) in enumerate(zip(ranges, devices, strict=True)):
        model = copy.deepcopy(reference).to(device)
        runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size, layers=layers)
        group = StageGroup(
            index, 2, rendezvous, device=torch.device(device), backend=backend, timeout_s=60
        )
        executors.append(Executor(runner, stages=group))
    pipeline = LocalPipeline(executors)
    started = time.perf_counter()
    pipeline.open()
    config = SchedulerConfig(
        num_blocks=num_blocks, block_size=block_size, max_model_len=512, max_batch_size=3,
        max_batched_tokens=48,
    )  # fmt: skip
    core = SchedulerCore(config, ShufflingPolicy(1))
    jobs = []
    for i in range(6):
        prompt = f"Stage check {i}: " + "pipelines pass activations " * (1 + i % 4)
        job = Job(f"j{i}", encode_prompt(tokenizer, prompt), max_tokens=4 + 5 * (i % 3))
        jobs.append(job)
        core.add_job(job)
    outputs: dict[str, list[int]] = {job.job_id: [] for job in jobs}
    iterations = 0
    try:
        while core.has_work():
            decision = core.schedule()
            result = pipeline.execute(decision)
            iterations += 1
            for event in core.update(decision, result.tokens):
                outputs[event.job_id].extend(event.token_ids)
    finally:
        pipeline.close()
    elapsed = time.perf_counter() - started
    mismatches = []
    for job in jobs:
        ref = hf_greedy(reference, job.prompt_token_ids, job.max_tokens)
        try:
            assert_greedy_matches(reference, job.prompt_token_ids, outputs[job.job_id], ref)
        except AssertionError as error:
            mismatches.append(str(error).splitlines()[0])
    return {
        "status": "ok" if not mismatches else "failed",
        "reason": "; ".join(mismatches[:2]),
        "devices": devices,
        "backend": backend,
        "iterations": iterations,
        "seconds": elapsed,
        "jobs": len(jobs),
        "mismatches": mismatches,
        "summary": (
            f"2 stages on {', '.join(devices)} over {backend}: {len(jobs) - len(mismatches)}/"
            f"{len(jobs)} jobs match transformers, {iterations} iterations in {elapsed:.1f} s"
        ),
    }


def step_nccl(args: argparse.Namespace) -> Result:
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device", "summary": "no CUDA device"}
    count = torch.cuda.device_count()
    if count < 2:
        reason = f"{count} GPU: NCCL refuses two pipeline ranks on one device; needs two GPUs"
        return {"status": "skipped", "reason": reason, "summary": reason}
    return run_two_stages(["cuda:0", "cuda:1"], "nccl")


STEPS: dict[str, Callable[[argparse.Namespace], Result]] = {
    "env": step_env,
    "gpu-tests": step_gpu_tests,
    "decode": step_decode,
    "stack-1b": step_stack,
    "stack-8b": step_stack,
    "stack-tiny": step_stack,
    "exactness": step_exactness,
    "swap": step_swap,
    "nccl": step_nccl,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        result = STEPS[args.step](args)
    except Exception as error:
        import traceback

        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
    args.result.write_text(json.dumps(result, indent=1, default=str))
    return 0 if result.get("status") in ("ok", "skipped") else 1


if __name__ == "__main__":
    raise SystemExit(main())
