"""The CPU paged-attention kernel (paged_attention.cpp): built once per machine, called by ctypes.

Why a compiled kernel rather than torch ops: any torch expression of "job s's keys" is an index
into the pool, i.e. a copy of the whole context per layer, and one SDPA call per job or a padded
batch. The kernel reads each block where it lies, for the whole step in one call. Compared with
torch's FlexAttention on CPU and with gather + SDPA in docs/engine-cpu.md.

The shared object is compiled with the machine's own instruction set (`-march=native`) into
FASTSERVE_KERNEL_CACHE (default ~/.cache/fastserve/kernels), named by a hash of the source, the
compiler and the CPU's flags, so a rebuilt image or another CPU gets its own build. Compiling
takes about 2 s; processes starting together each compile to a private file and rename it into
place. Where no compiler is found or the cache cannot be written, `load()` returns None and the
caller falls back to the reference path (with a warning).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from services.worker.attention.metadata import AttentionMetadata

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")
KERNEL_CACHE = Path(
    os.environ.get("FASTSERVE_KERNEL_CACHE", Path.home() / ".cache" / "fastserve" / "kernels")
)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class _Params(ctypes.Structure):
    """Mirrors `struct Params` in paged_attention.cpp, field for field."""

    _fields_ = [
        ("query", ctypes.c_void_p),
        ("q_stride_row", ctypes.c_int64),
        ("q_stride_head", ctypes.c_int64),
        ("key_cache", ctypes.c_void_p),
        ("value_cache", ctypes.c_void_p),
        ("kv_stride_block", ctypes.c_int64),
        ("kv_stride_pos", ctypes.c_int64),
        ("kv_stride_head", ctypes.c_int64),
        ("block_tables", ctypes.c_void_p),
        ("block_table_stride", ctypes.c_int64),
        ("query_start", ctypes.c_void_p),
        ("seq_lens", ctypes.c_void_p),
        ("num_seqs", ctypes.c_int32),
        ("num_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("window", ctypes.c_int32),
        ("out", ctypes.c_void_p),
        ("out_stride_row", ctypes.c_int64),
        ("out_stride_head", ctypes.c_int64),
        ("num_threads", ctypes.c_int32),
    ]


class CpuPagedAttention:
    """Calls the compiled kernel; `plan` once per step, `__call__` once per layer."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.fastserve_paged_attention
        self._fn.argtypes = [ctypes.POINTER(_Params), ctypes.c_int]
        self._fn.restype = ctypes.c_int

    def plan(self, meta: AttentionMetadata) -> _Params:
        """The step's share of the kernel's arguments (the layers fill in the rest)."""
        for name in ("query_start", "seq_lens", "block_tables"):
            tensor = getattr(meta, name)
            if tensor.dtype != torch.int32 or not tensor.is_contiguous():
                raise ValueError(f"attention metadata {name} must be contiguous int32")
        params = _Params()
        params.block_tables = meta.block_tables.data_ptr()
        params.block_table_stride = meta.block_tables.stride(0)
        params.query_start = meta.query_start.data_ptr()
        params.seq_lens = meta.seq_lens.data_ptr()
        params.num_seqs = meta.num_seqs
        params.num_threads = torch.get_num_threads()
        return params

    def __call__(
        self,
        params: _Params,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        *,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """query [T, heads, head_dim] (rows may be strided, e.g. a view of a fused QKV output);
        caches [num_blocks, block_size, kv_heads, head_dim] with their last two dims dense.
        Returns [T, heads, head_dim]."""
        _check_dense_tail(query, 1, "query")
        _check_dense_tail(key_cache, 2, "key_cache")
        if value_cache.stride() != key_cache.stride():
            raise ValueError("key_cache and value_cache must have the same strides")
        if not query.dtype == key_cache.dtype == value_cache.dtype:
            raise ValueError("query and caches must have one dtype")
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        params.query = query.data_ptr()
        params.q_stride_row, params.q_stride_head = query.stride(0), query.stride(1)
        params.key_cache = key_cache.data_ptr()
        params.value_cache = value_cache.data_ptr()
        params.kv_stride_block, params.kv_stride_pos, params.kv_stride_head = key_cache.stride()[:3]
        params.num_heads = query.shape[1]
        params.num_kv_heads = key_cache.shape[2]
        params.head_dim = query.shape[2]
        params.block_size = key_cache.shape[1]
        params.scale = scale
        params.window = window or 0
        params.out = out.data_ptr()
        params.out_stride_row, params.out_stride_head = out.stride(0), out.stride(1)
        code = self._fn(ctypes.byref(params), _DTYPE_CODES[query.dtype])
        if code:
            raise ValueError(f"paged attention kernel refused its arguments (code {code})")
        return out


def _check_dense_tail(tensor: torch.Tensor, num_dims: int, name: str) -> None:
    expected = 1
    for dim in range(tensor.dim() - 1, tensor.dim() - 1 - num_dims, -1):
        if tensor.stride(dim) != expected:
            raise ValueError(f"{name}: its last {num_dims} dims must be dense")
        expected *= tensor.shape[dim]
    if tensor.device.type != "cpu":
        raise ValueError(f"{name}: the CPU kernel needs CPU tensors")
    if tensor.dtype not in _DTYPE_CODES:
        raise ValueError(f"{name}: dtype {tensor.dtype} not supported")


_loaded: CpuPagedAttention | None = None
_failed = False


def load() -> CpuPagedAttention | None:
    """The kernel, built on first use; None (after one warning) where it cannot be built."""
    global _loaded, _failed
    if _loaded is None and not _failed:
        try:
            _loaded = CpuPagedAttention(ctypes.CDLL(str(_build())))
        except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
            _failed = True
            log.warning("CPU paged-attention kernel unavailable (%s): reference path", exc)
    return _loaded


def _build() -> Path:
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(FLAGS).encode(), _cpu_flags()):
        key.update(part)
    target = KERNEL_CACHE / f"paged_attention-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    KERNEL_CACHE.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix=".paged_attention-", suffix=".so", dir=KERNEL_CACHE)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, "-o", scratch, str(SOURCE)], capture_output=True, check=True
        )
        os.replace(scratch, target)
    finally:
        Path(scratch).unlink(missing_ok=True)
    log.info("built the CPU paged-attention kernel: %s", target)
    return target


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()
