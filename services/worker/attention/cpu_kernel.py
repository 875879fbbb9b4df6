"""The CPU paged-attention kernel (services/worker/native/paged_attention.cpp), called by ctypes.

Why a compiled kernel rather than torch ops: any torch expression of "job s's keys" is an index
into the pool, i.e. a copy of the whole context per layer, and one SDPA call per job or a padded
batch. The kernel reads each block where it lies, for the whole step in one call. Compared with
torch's FlexAttention on CPU and with gather + SDPA in docs/results/engine-cpu.md.
"""

from __future__ import annotations

import ctypes

import torch

from services.worker import native
from services.worker.attention.metadata import AttentionMetadata

_DTYPE_CODES = native.DTYPE_CODES


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


def load() -> CpuPagedAttention | None:
    """The kernel, or None where the native library cannot be built here."""
    library = native.library()
    return CpuPagedAttention(library) if library is not None else None
