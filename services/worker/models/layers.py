"""Building blocks shared by the model families: RMSNorm, rotary embedding, gated MLP.
The element-wise ops that run them live in ops.py (torch or native).

Each computes what its Hugging Face counterpart computes, in the same order of operations where
that order changes float results (RMSNorm in float32, rotary as `x * cos + rotate_half(x) *
sin`), so greedy output stays token-identical to transformers' `generate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class Linear(nn.Linear):
    """nn.Linear that can trade its weight for oneDNN's blocked layout on CPU (`pack`).

    On CPU a small batch's matmul is a read of the weights, and oneDNN's prepacked layout reads
    them faster than MKL's plain row-major one (numbers: docs/results/engine-cpu.md). vLLM's
    CPU backend packs its weights the same way. The sums run in another order than MKL's, so
    logits differ from unpacked ones in the last bits (the exactness tests allow for that).
    """

    packed: torch.Tensor | None = None

    def pack(self, batch_hint: int = 16) -> None:
        """Keeps only the packed weight; `batch_hint` rows is the shape oneDNN tunes for."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_hint)
        self.weight = None  # type: ignore[assignment]  # only the packed copy is used now

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN runs this dtype's matmuls natively here (float32 always, bfloat16 with
    AVX512_BF16 or AMX)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op, the same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)


class RotaryTable:
    """cos and sin of every position up to the model's length, [max_len, head_dim] each, made
    once by transformers' own rotary module (so llama3, linear and yarn scaling match HF) and
    looked up per step by position."""

    def __init__(self, config: PretrainedConfig, *, dtype: torch.dtype, device: torch.device):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        max_len = int(getattr(config, "max_position_embeddings", 2048))
        rotary = LlamaRotaryEmbedding(config).to(device)
        positions = torch.arange(max_len, device=device)[None]
        probe = torch.empty(0, dtype=dtype, device=device)
        cos, sin = rotary(probe, positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, head_dim] for the step's rows (broadcast over heads)."""
        return self.cos[positions][:, None], self.sin[positions][:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by position (HF's apply_rotary_pos_emb, for q or k)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up as one matmul (run by the model, whose
    layer ops fuse the SiLU and the product)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(
            hidden_size, 2 * intermediate_size, bias=False, dtype=dtype, device=device
        )
        self.down_proj = Linear(
            intermediate_size, hidden_size, bias=False, dtype=dtype, device=device
        )
