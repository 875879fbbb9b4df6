"""The element-wise ops of a decoder layer, in two implementations with one meaning:
- `TorchOps`: torch ops, written as Hugging Face writes them (any device; the reference);
- `NativeOps`: services/worker/native/layer_ops.cpp, one fused pass each (CPU);
- `TritonOps`: services/worker/kernels/layer_ops.py, one kernel launch each (CUDA).

`add_rms_norm(x, delta, norm)` adds `delta` into the residual stream `x` in place (when given)
and returns RMSNorm(x); `rope_store` rotates q and k inside the fused QKV output in place and
writes k and v into the block pool; `silu_mul` is SiLU(gate) * up of the fused gate/up output.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from services.worker import native
from services.worker.models.layers import RMSNorm, RotaryTable, apply_rotary


class TorchOps:
    name = "torch"

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm):
        if delta is not None:
            x += delta
        return norm(x)

    def rope_store(
        self,
        qkv: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        positions: torch.Tensor,
        rotary: RotaryTable,
        kv: tuple[torch.Tensor, torch.Tensor],
        slots: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """qkv [T, heads + 2 * kv_heads, head_dim]; returns the rotated query [T, heads, D]."""
        cos, sin = rotary.lookup(positions)
        qk = apply_rotary(qkv[:, : num_heads + num_kv_heads], cos, sin)  # q and k at once
        key_cache, value_cache = kv
        key_cache[slots] = qk[:, num_heads:]
        value_cache[slots] = qkv[:, num_heads + num_kv_heads :]
        return qk[:, :num_heads]

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class TritonOps:
    name = "triton"

    def __init__(self) -> None:
        from services.worker.kernels import layer_ops

        self._kernels = layer_ops

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm):
        return self._kernels.add_rms_norm(x, delta, norm.weight, norm.eps)

    def rope_store(
        self,
        qkv: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        positions: torch.Tensor,
        rotary: RotaryTable,
        kv: tuple[torch.Tensor, torch.Tensor],
        slots: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        return self._kernels.rope_store(
            qkv, num_heads, num_kv_heads, positions, rotary.cos, rotary.sin, kv, slots
        )

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._kernels.silu_mul(gate_up)


class NativeOps:
    name = "native"

    def __init__(self, library: ctypes.CDLL) -> None:
        # Argument types as in layer_ops.cpp's extern "C" signatures (_bind's letters).
        self._norm = _bind(library, "fastserve_add_rms_norm", "pppp lllll f ii")
        self._rope = _bind(library, "fastserve_rope_store", "pll iii ppppp lll pp ii")
        self._silu = _bind(library, "fastserve_silu_mul", "pp ll ii")

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm):
        _check_rows(x, "x")
        out = torch.empty_like(x)
        if delta is not None:
            _check_rows(delta, "delta")
        _ok(
            self._norm(
                x.data_ptr(),
                None if delta is None else delta.data_ptr(),
                norm.weight.data_ptr(),
                out.data_ptr(),
                x.shape[0],
                x.shape[1],
                x.stride(0),
                0 if delta is None else delta.stride(0),
                out.stride(0),
                norm.eps,
                native.DTYPE_CODES[x.dtype],
                native.num_threads(),
            )
        )
        return out

    def rope_store(
        self,
        qkv: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        positions: torch.Tensor,
        rotary: RotaryTable,
        kv: tuple[torch.Tensor, torch.Tensor],
        slots: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        key_cache, value_cache = kv
        rows, _, head_dim = qkv.shape
        if not qkv.is_contiguous() or key_cache.stride() != value_cache.stride():
            raise ValueError("rope_store needs a dense qkv and caches of one layout")
        if key_cache.stride(-1) != 1 or key_cache.stride(-2) != head_dim:
            raise ValueError("rope_store: the caches' last two dims must be dense")
        blocks, offsets = slots
        for index in (positions, blocks, offsets):
            if index.dtype != torch.int32 or not index.is_contiguous():
                raise ValueError("rope_store: positions and slots must be dense int32")
        _ok(
            self._rope(
                qkv.data_ptr(),
                rows,
                qkv.stride(0),
                num_heads,
                num_kv_heads,
                head_dim,
                rotary.cos.data_ptr(),
                rotary.sin.data_ptr(),
                positions.data_ptr(),
                key_cache.data_ptr(),
                value_cache.data_ptr(),
                *key_cache.stride()[:3],
                blocks.data_ptr(),
                offsets.data_ptr(),
                native.DTYPE_CODES[qkv.dtype],
                native.num_threads(),
            )
        )
        return qkv[:, :num_heads]

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        _check_rows(gate_up, "gate_up")
        if gate_up.stride(0) != gate_up.shape[1]:
            raise ValueError("silu_mul needs a dense gate_up")
        width = gate_up.shape[1] // 2
        out = torch.empty((gate_up.shape[0], width), dtype=gate_up.dtype, device=gate_up.device)
        _ok(
            self._silu(
                gate_up.data_ptr(),
                out.data_ptr(),
                gate_up.shape[0],
                width,
                native.DTYPE_CODES[gate_up.dtype],
                native.num_threads(),
            )
        )
        return out


_CTYPES = {"p": ctypes.c_void_p, "l": ctypes.c_int64, "i": ctypes.c_int, "f": ctypes.c_float}


def _bind(library: ctypes.CDLL, name: str, signature: str) -> ctypes._CFuncPtr:
    """`library.name` returning int, its arguments typed by `signature`: p pointer, l int64,
    i int, f float (spaces only group them for reading)."""
    function = getattr(library, name)
    function.restype = ctypes.c_int
    function.argtypes = [_CTYPES[letter] for letter in signature.replace(" ", "")]
    return function


def _check_rows(tensor: torch.Tensor, name: str) -> None:
    if tensor.dim() != 2 or tensor.stride(1) != 1 or tensor.device.type != "cpu":
        raise ValueError(f"{name}: native ops need CPU rows [T, width] with dense rows")
    if tensor.dtype not in native.DTYPE_CODES:
        raise ValueError(f"{name}: dtype {tensor.dtype} not supported")


def _ok(code: int) -> None:
    if code:
        raise ValueError(f"native layer op refused its arguments (code {code})")
