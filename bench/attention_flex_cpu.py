"""FlexAttention (torch.compile, inductor's C++ CPU template) as a paged-attention backend, reading
the worker's KV pool in place, against "gather + SDPA" (the reference path, what the worker did
before it had a kernel) and against the worker's native kernel (services/worker/native).

Standalone: builds its own pool with the worker's layout [num_blocks, num_layers, 2, block_size,
kv_heads, head_dim] (SmolLM2-135M shapes: 30 layers, 9 heads, 3 kv heads, head_dim 64, block 16),
fills it with random data, and times one layer's attention for decode batches, a mixed batch
(decodes + chunked prefills) and one 512-token prefill, in float32 and bfloat16.

How the pool is read in place
-----------------------------
FlexAttention wants K and V as [B_kv, H_kv, S_kv, D] with one stride per dim. A layer's keys,
pool[:, layer, 0], are [num_blocks, block_size, kv_heads, head_dim] with block stride
num_layers*2*block_size*kv_heads*head_dim, so (block, offset) cannot be merged into one position
dim. The whole pool, though, IS one run of positions: pool.view(-1, kv_heads, head_dim). In it the
keys of (block p, layer l) start at position (p*2L + 2l)*bs and the values at (p*2L + 2l + 1)*bs.
So per layer we pass
    K_l = flat[2l*bs : 2l*bs + KV_LEN]      V_l = flat[(2l+1)*bs : (2l+1)*bs + KV_LEN]
as [1, H_kv, KV_LEN, D] views (batch 1, broadcast over the query batch), and physical block p is
flex "kv page" p*2L in both, for every layer. The other layers' pages are never listed in the
block mask, so never read. The block mask (kv_indices = p*2L per visible block, per query tile)
and the mask_mod (logical position of a physical kv index through a [num_seqs, num_blocks]
block->logical-page table) are the same for all layers of a step: build once per step.

Constraints hit (see /tmp/flex_report.md):
* the block mask's shape must equal (q_len, KV_LEN) and the CPU lowering asserts
  kv_indices.size(-1) * KV_BLOCK >= KV_LEN: kv_indices must be [.., num_blocks*2L] wide. We pass an
  overlapping as_strided view (the real columns are only max_blocks wide; the kernel reads only
  kv_num_blocks entries per row).
* with static shapes and q_len 1, inductor picks its flash-decoding template, which sizes its
  partitions from KV_LEN (the whole pool) when sequences have different block counts: unusable.
  PARTITION_SIZE not a multiple of the kv block (kernel_options) keeps the ordinary template.

    .venv/bin/python -m bench.attention_flex_cpu [--quick] [--dtypes float32,bfloat16]
    .venv/bin/python -m bench.attention_flex_cpu --cache-probe   # cross-process compile cache
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.flex_paged import (
    BLOCK_SIZE,
    HEAD_DIM,
    LAYER,
    NUM_HEADS,
    NUM_KV_HEADS,
    NUM_LAYERS,
    FlexPaged,
)

# --------------------------------------------------------------------------- workload


@dataclass
class Batch:
    name: str
    query: torch.Tensor  # [T, H, D]
    block_tables: torch.Tensor  # [S, max_blocks] int32
    query_start: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    q_lens: list[int]
    seq_lens_list: list[int]


def make_pool(num_blocks: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def make_batch(
    name: str,
    seqs: list[tuple[int, int]],  # (seq_len, q_len) per seq
    num_blocks: int,
    dtype: torch.dtype,
    seed: int = 1,
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g)  # scattered physical blocks
    need = [math.ceil(s / BLOCK_SIZE) for s, _ in seqs]
    assert sum(need) <= num_blocks, "pool too small"
    max_blocks = max(need)
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)  # padded with block 0
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
    q_lens = [q for _, q in seqs]
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, generator=g).to(dtype)
    seq_lens = torch.tensor([s for s, _ in seqs], dtype=torch.int32)
    return Batch(name, query, tables, query_start, seq_lens, q_lens, [s for s, _ in seqs])


def jittered(ctx: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    spread = max(1, ctx // 5)
    return [ctx + int(x) for x in torch.randint(-spread, spread + 1, (n,), generator=g)]


# --------------------------------------------------------------------------- reference, baseline


def reference(key_cache, value_cache, b: Batch, scale, window) -> torch.Tensor:
    """float64, per seq, per query row: the definition."""
    out = torch.empty(b.query.shape, dtype=torch.float64)
    groups = NUM_HEADS // NUM_KV_HEADS
    for s, (seq_len, q_len) in enumerate(zip(b.seq_lens_list, b.q_lens, strict=True)):
        nb = math.ceil(seq_len / BLOCK_SIZE)
        tbl = b.block_tables[s, :nb].long()
        k = key_cache[tbl].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:seq_len].double()
        v = value_cache[tbl].reshape(-1, NUM_KV_HEADS, HEAD_DIM)[:seq_len].double()
        k = k.repeat_interleave(groups, 1).transpose(0, 1)  # [H, S, D]
        v = v.repeat_interleave(groups, 1).transpose(0, 1)
        r0 = int(b.query_start[s])
        q = b.query[r0 : r0 + q_len].double().transpose(0, 1)  # [H, q, D]
        qpos = torch.arange(seq_len - q_len, seq_len)[:, None]
        kpos = torch.arange(seq_len)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        scores = (q @ k.transpose(1, 2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        out[r0 : r0 + q_len] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out


def _causal(key_pos, query_pos, window):
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask


def gather_sdpa(query, key_cache, value_cache, block_tables, query_start, seq_lens, scale, window):
    """The baseline, as model_runner does it: decodes batched (gathered, padded, masked),
    prefill chunks one at a time (gathered, causal / masked)."""
    q_lens = (query_start[1:] - query_start[:-1]).tolist()
    lens = seq_lens.tolist()
    out = torch.empty_like(query)
    dec = [i for i, q in enumerate(q_lens) if q == 1]
    if dec:
        nb = max(math.ceil(lens[i] / BLOCK_SIZE) for i in dec)
        tbl = block_tables[dec, :nb].long()
        shape = (len(dec), nb * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        keys = key_cache[tbl].reshape(shape).transpose(1, 2)
        values = value_cache[tbl].reshape(shape).transpose(1, 2)
        rows = query_start[dec].long()
        pos = seq_lens[dec].long() - 1
        mask = _causal(torch.arange(nb * BLOCK_SIZE)[None, :], pos[:, None], window)
        o = F.scaled_dot_product_attention(
            query[rows].unsqueeze(2),
            keys,
            values,
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = o.squeeze(2)
    for i, q_len in enumerate(q_lens):
        if q_len == 1:
            continue
        end, start = lens[i], lens[i] - q_len
        nb = math.ceil(end / BLOCK_SIZE)
        tbl = block_tables[i : i + 1, :nb].long()
        shape = (1, nb * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        keys = key_cache[tbl].reshape(shape).transpose(1, 2)[:, :, :end]
        values = value_cache[tbl].reshape(shape).transpose(1, 2)[:, :, :end]
        mask = None
        if start > 0 or (window is not None and window < end):
            mask = _causal(torch.arange(end)[None, :], torch.arange(start, end)[:, None], window)
        r0 = int(query_start[i])
        o = F.scaled_dot_product_attention(
            query[r0 : r0 + q_len].transpose(0, 1).unsqueeze(0),
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[r0 : r0 + q_len] = o[0].transpose(0, 1)
    return out


# --------------------------------------------------------------------------- timing


def interleaved_times(fns: dict, min_reps=25, budget_s=3.0) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per fn, the fns run in turn so that load from other processes on
    the machine hits all of them alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    t_end = time.perf_counter() + budget_s
    reps = 0
    while reps < min_reps or (time.perf_counter() < t_end and reps < 500):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        reps += 1
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def native_fn(b: Batch, key_cache, value_cache, scale):
    """The worker's own CPU kernel (services/worker/native/paged_attention.cpp) on the batch."""
    from services.worker.attention import cpu_kernel
    from services.worker.attention.metadata import AttentionMetadata

    kernel = cpu_kernel.load()
    meta = AttentionMetadata(
        query_start=b.query_start,
        seq_lens=b.seq_lens,
        block_tables=b.block_tables,
        slot_blocks=b.seq_lens,  # unused by attention
        slot_offsets=b.seq_lens,
        query_lens_host=tuple(b.q_lens),
        seq_lens_host=tuple(b.seq_lens_list),
    )
    plan = kernel.plan(meta)
    return lambda: kernel(plan, b.query, key_cache, value_cache, scale=scale, window=None)


def _timed_calls(flex, call, b, masks, scale) -> dict:
    return {
        "native": native_fn(b, call[1], call[2], scale),
        "base": lambda: gather_sdpa(*call),
        "flex": lambda: flex(*call),  # incl. the per-step block mask build
        "flex_layer": lambda: flex.forward(b.query, LAYER, b.query_start, masks, scale),
        "mask": lambda: flex.prepare(b.block_tables, b.query_start, b.seq_lens),
    }


def compile_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def scenarios(num_blocks, dtype, quick):
    out = []
    sizes = [1, 4, 16]
    ctxs = [50, 200, 1000]
    for n in sizes:
        for ctx in ctxs:
            if quick and (n, ctx) not in [(1, 200), (16, 200), (16, 1000)]:
                continue
            lens = jittered(ctx, n, seed=n * 1000 + ctx)
            out.append(
                make_batch(f"decode B={n} ctx~{ctx}", [(s, 1) for s in lens], num_blocks, dtype)
            )
    dec = jittered(400, 12, seed=7)
    mixed = [(s, 1) for s in dec] + [(64, 64), (328, 200)]
    out.append(make_batch("mixed 12 dec + 64 + 200@128", mixed, num_blocks, dtype))
    out.append(make_batch("prefill 512", [(512, 512)], num_blocks, dtype))
    return out


def run_bench(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    rows = []
    scale = 1.0 / math.sqrt(HEAD_DIM)
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        pool = make_pool(args.num_blocks, dtype)
        key_cache, value_cache = pool[:, LAYER, 0], pool[:, LAYER, 1]
        torch._dynamo.reset()
        flex = FlexPaged(
            pool,
            dynamic=args.dynamic,
            prefill_q_block=args.q_block,
            partition_size=args.partition_size,
            split=not args.no_split,
        )
        for b in scenarios(args.num_blocks, dtype, args.quick):
            call = (
                b.query,
                key_cache,
                value_cache,
                b.block_tables,
                b.query_start,
                b.seq_lens,
                scale,
                None,
            )
            ref = reference(key_cache, value_cache, b, scale, None)
            base_out = gather_sdpa(*call)
            graphs0 = compile_count()
            t0 = time.perf_counter()
            flex_out = flex(*call)
            first = time.perf_counter() - t0
            new_graphs = compile_count() - graphs0
            masks = flex.prepare(b.block_tables, b.query_start, b.seq_lens)
            t = interleaved_times(_timed_calls(flex, call, b, masks, scale), budget_s=args.budget)
            native_out = native_fn(b, key_cache, value_cache, scale)()
            row = dict(
                err_native=(native_out.double() - ref).abs().max().item(),
                dtype=dtype_name,
                case=b.name,
                T=b.query.shape[0],
                first_call_s=first,
                new_graphs=new_graphs,
                **{f"{k}_ms": v[0] * 1e3 for k, v in t.items()},
                **{f"{k}_min_ms": v[1] * 1e3 for k, v in t.items()},
                err_flex=(flex_out.double() - ref).abs().max().item(),
                err_base=(base_out.double() - ref).abs().max().item(),
            )
            rows.append(row)
            print(
                f"{dtype_name:8s} {b.name:28s} T={row['T']:4d} first={first:7.2f}s "
                f"graphs+{new_graphs} "
                f"native={row['native_ms']:7.3f}ms (err {row['err_native']:.1e}) "
                f"base={row['base_ms']:7.3f}ms flex={row['flex_ms']:7.3f}ms "
                f"(layer {row['flex_layer_ms']:7.3f} + mask {row['mask_ms']:6.3f}) "
                f"min base={row['base_min_ms']:.3f} flex={row['flex_min_ms']:.3f} "
                f"layer={row['flex_layer_min_ms']:.3f} mask={row['mask_min_ms']:.3f} "
                f"err flex={row['err_flex']:.2e} base={row['err_base']:.2e}",
                flush=True,
            )
    return rows


def check_window(args):
    """Correctness of the sliding-window path (SmolLM2 has none; the interface does)."""
    torch.set_num_threads(args.threads)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    pool = make_pool(args.num_blocks, torch.float32)
    kc, vc = pool[:, LAYER, 0], pool[:, LAYER, 1]
    flex = FlexPaged(
        pool,
        window=100,
        dynamic=args.dynamic,
        prefill_q_block=args.q_block,
        partition_size=args.partition_size,
    )
    seqs = [(s, 1) for s in jittered(300, 5, 3)] + [(64, 64), (328, 200)]
    b = make_batch("window", seqs, args.num_blocks, torch.float32)
    call = (b.query, kc, vc, b.block_tables, b.query_start, b.seq_lens, scale, 100)
    ref = reference(kc, vc, b, scale, 100)
    print(
        f"window=100: max err flex {(flex(*call).double() - ref).abs().max().item():.2e} "
        f"base {(gather_sdpa(*call).double() - ref).abs().max().item():.2e}"
    )


def cache_probe_child() -> None:
    """One process: first call of a decode and a mixed step; prints seconds."""
    torch.set_num_threads(2)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    pool = make_pool(512, torch.float32)
    flex = FlexPaged(pool)
    kc, vc = pool[:, LAYER, 0], pool[:, LAYER, 1]
    for b in [
        make_batch("d", [(s, 1) for s in jittered(200, 4, 1)], 512, torch.float32),
        make_batch("m", [(100, 1), (300, 1), (64, 64), (328, 200)], 512, torch.float32),
    ]:
        t0 = time.perf_counter()
        flex(b.query, kc, vc, b.block_tables, b.query_start, b.seq_lens, scale, None)
        print(f"first call {b.name}: {time.perf_counter() - t0:.2f}s", flush=True)


def cache_probe() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        # No compiler: an empty PATH (inductor looks g++ up on PATH). Setting CXX=/bin/false
        # instead changes inductor's config, which is part of the FX-graph-cache key: a miss.
        no_cxx = {"PATH": cache + "/empty-bin"}
        for label, extra in [
            ("cold cache", {}),
            ("warm cache", {}),
            ("warm cache, no g++ on PATH", no_cxx),
            ("cold cache, no g++ on PATH", {**no_cxx, "TORCHINDUCTOR_CACHE_DIR": cache + "/other"}),
        ]:
            t0 = time.perf_counter()
            p = subprocess.run(
                [sys.executable, "-m", "bench.attention_flex_cpu", "--cache-probe-child"],
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                env={**env, **extra},
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t0
            tail = (
                p.stdout.strip().replace("\n", "; ")
                if p.returncode == 0
                else "FAILED: " + p.stderr.strip().splitlines()[-1][:200]
            )
            print(f"{label:30s} process wall {wall:6.2f}s  {tail}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--q-block", type=int, default=32, help="q tile for prefill chunks")
    ap.add_argument(
        "--partition-size",
        type=int,
        default=24,
        help="flex-decoding partition; not a multiple of 16 = ordinary template; 0 = default",
    )
    ap.add_argument("--dynamic", choices=["none", "true", "false"], default="none")
    ap.add_argument("--no-split", action="store_true", help="decodes and prefills in one call")
    ap.add_argument("--window", action="store_true", help="also check a sliding window")
    ap.add_argument("--cache-probe", action="store_true")
    ap.add_argument("--cache-probe-child", action="store_true")
    args = ap.parse_args()
    args.dynamic = {"none": None, "true": True, "false": False}[args.dynamic]
    args.partition_size = args.partition_size or None
    if args.cache_probe_child:
        return cache_probe_child()
    if args.cache_probe:
        return cache_probe()
    print(
        f"torch {torch.__version__}, threads {args.threads}, pool {args.num_blocks} blocks x "
        f"{NUM_LAYERS} layers, dynamic={args.dynamic}, partition={args.partition_size}, "
        f"prefill q tile {args.q_block}, split={not args.no_split}"
    )
    rows = run_bench(args)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.window:
        check_window(args)


if __name__ == "__main__":
    main()
