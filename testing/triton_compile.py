"""Compiles the worker's Triton kernels for a GPU on a machine without one (`python -m
testing.triton_compile`): each variant the worker launches, through Triton's compiler down to a
cubin for the target (sm_90 by default: H100 and H200), with the ptxas that Triton's wheel ships.

Triton's interpreter (how the tests run the kernels on CPU) executes the kernels as numpy and
never compiles them, so it cannot see what only the compiler refuses (a construct Triton cannot
lower, a type that changes across a loop, a shape tl.dot rejects). This does. It must run in a
process where Triton is not in interpreter mode (TRITON_INTERPRET unset or 0).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable
from typing import Any

# Pointers to int32 index buffers (the step's packed buffer, ModelRunner._pack); every other
# pointer is to the model's dtype.
INDEX_POINTERS = {
    "block_tables_ptr",
    "seq_lens_ptr",
    "query_start_ptr",
    "positions_ptr",
    "slot_blocks_ptr",
    "slot_offsets_ptr",
}
FLOAT_SCALARS = {"scale", "eps"}


def signature(fn: Callable[..., Any], dtype: str, constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton's signature of a kernel function: pointers by role, float scalars, int32 ints
    (sizes and strides a launch passes as Python ints below 2**31)."""
    types = {}
    for name in inspect.signature(fn).parameters:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = "*i32" if name in INDEX_POINTERS else f"*{dtype}"
        elif name in FLOAT_SCALARS:
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def variants() -> list[tuple[str, Callable[..., Any], str, dict[str, Any]]]:
    """(label, kernel function, dtype, constexprs) of what the worker launches: attention for a
    decode step and a prompt step, full and sliding-window, bf16 and float32 (IEEE products);
    the layer ops in both dtypes. Shapes: Llama-3's (32 heads over 8 KV heads of 128)."""
    from services.worker.kernels import layer_ops
    from services.worker.kernels import paged_attention as attention

    out = []
    for dtype, precision in (("bf16", None), ("fp32", "ieee")):
        for block_q, window in ((4, 0), (16, 0), (4, 4096), (16, 4096)):
            out.append(
                (
                    f"paged_attention {dtype} block_q={block_q} window={window}",
                    attention._paged_attention,
                    dtype,
                    dict(
                        QUERIES_PER_KV=4, GROUP=4, HEAD_DIM=128, HEAD_DIM_PADDED=128,
                        BLOCK_SIZE=16, BLOCK_Q=block_q, TILE=32, WINDOW=window,
                        PRECISION=precision,
                    ),
                )
            )  # fmt: skip
        for has_delta in (True, False):
            out.append(
                (
                    f"add_rms_norm {dtype} delta={has_delta}",
                    layer_ops._add_rms_norm,
                    dtype,
                    dict(HAS_DELTA=has_delta, BLOCK=4096),
                )
            )
        out.append(
            (
                f"rope_store {dtype}",
                layer_ops._rope_store,
                dtype,
                dict(NUM_HEADS=32, NUM_KV_HEADS=8, HEAD_DIM=128, HALF_PADDED=64),
            )
        )
        out.append((f"silu_mul {dtype}", layer_ops._silu_mul, dtype, dict(BLOCK=1024)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    args = parser.parse_args(argv)

    from services.worker.kernels import interpreting, jit  # imports no triton yet

    if interpreting():
        print("TRITON_INTERPRET is set: nothing would be compiled", file=sys.stderr)
        return 2
    # Imported before the kernel modules, which would otherwise choose the interpreter for a
    # machine without CUDA.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for label, fn, dtype, constexprs in variants():
        started = time.perf_counter()
        source = ASTSource(fn=jit(fn), signature=signature(fn, dtype, constexprs),
                           constexprs=constexprs)  # fmt: skip
        try:
            compiled = triton.compile(source, target=target)
        except Exception as exc:
            failed += 1
            print(f"FAILED {label}: {type(exc).__name__}: {exc}")
            continue
        size = len(compiled.asm.get("cubin", b""))
        print(f"ok {label}: {size} bytes of cubin in {time.perf_counter() - started:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
