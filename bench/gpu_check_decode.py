"""The decode step of `bench.gpu_check`: one decode step of our engine against transformers eager
on the same weights, and the bound (weight + KV bytes) / measured copy bandwidth."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.gpu_check_common import BLOCK_SIZE, Result, cuda_mode, sync

VOCAB = 8192
WARMUP = 5  # steps before timing (the first few pack weights, pick kernels)
# The shapes: Llama-3.2-1B and Llama-3-8B, vocabulary 8,192; `tiny` is the test model's.
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)
SHAPES: dict[str, dict[str, int]] = {
    name: dict(zip(SHAPE_FIELDS, sizes, strict=True))
    for name, sizes in {
        "1B": (2048, 16, 32, 8, 8192),
        "8B": (4096, 32, 32, 8, 14336),
        "tiny": (64, 4, 4, 2, 128),
        "small": (256, 4, 8, 2, 768),
    }.items()
}


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
    on_gpu = next(hf.parameters()).device.type == "cuda"
    runner = ModelRunner(
        hf,
        num_blocks=max(batches) * blocks_per_job + 1,
        block_size=BLOCK_SIZE,
        graph_max_batch=max(batches) if on_gpu else 0,  # as the worker runs on a GPU
        graph_max_len=blocks_per_job * BLOCK_SIZE,
    )
    graphs = runner.graphs
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
        eager = ours
        if graphs is not None:  # the same step without its graph
            runner.graphs = None
            eager = median_seconds(lambda seqs=seqs: runner.step(seqs), WARMUP, repeats)
            runner.graphs = graphs
        rows.append(
            {
                "shape": shape,
                "batch": batch,
                "context": context,
                "ours_ms": 1e3 * ours,
                "eager_ms": 1e3 * eager,
                "graphs": graphs is not None,
                "graph_capture_s": graphs.capture_s if graphs is not None else None,
                "attention": runner.attention.name,
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
