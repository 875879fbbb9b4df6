"""Llama, Qwen2 and Mistral (with sliding window) as one compact module, written for serving.

The three differ in two details: Qwen2 adds biases to q, k and v; Mistral, and Qwen2 layers
typed "sliding_attention", see only the last `sliding_window` positions. Everything else is the
Llama block: RMSNorm -> attention -> residual -> RMSNorm -> gated MLP -> residual.

As vLLM and nano-vllm do, q, k and v are one matmul (`qkv_proj`) and gate and up another
(`gate_up_proj`); the step's tokens of every job are rows of one [T, hidden] tensor, so each
matmul runs once per layer whatever the mix of prefills and decodes; and attention reads the
paged KV pool in place through `PagedAttention` (one call per layer for the whole step). A model
holds only its pipeline stage's layers; stage 0 adds the embedding, the last stage the final norm
and the LM head. Inputs are tensors of fixed meaning (rows, positions, attention metadata) so a
GPU step can be captured as a graph per batch size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.attention import PagedAttention
from services.worker.kv_cache import KVCache
from services.worker.models.layers import GatedMLP, Linear, RMSNorm, RotaryTable, can_pack
from services.worker.models.ops import NativeOps, TorchOps, TritonOps

LayerOps = NativeOps | TorchOps | TritonOps

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def num_kv_heads(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def sliding_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding window (None = full attention), as transformers decides it:
    Qwen2 types its layers, Mistral sets one window for all, Llama has none."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    return [window] * config.num_hidden_layers


class Attention(nn.Module):
    def __init__(
        self, config: PretrainedConfig, window: int | None, *, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = num_kv_heads(config)
        self.head_dim = head_dim(config)
        self.scale = self.head_dim**-0.5
        self.window = window
        bias = config.model_type == "qwen2"
        self.qkv_proj = Linear(
            config.hidden_size,
            (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
            bias=bias,
            dtype=dtype,
            device=device,
        )
        self.o_proj = Linear(
            self.num_heads * self.head_dim,
            config.hidden_size,
            bias=False,
            dtype=dtype,
            device=device,
        )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryTable,
        kv: tuple[torch.Tensor, torch.Tensor],
        slots: tuple[torch.Tensor, torch.Tensor],
        attention: PagedAttention,
        ops: LayerOps,
    ) -> torch.Tensor:
        num_rows = x.shape[0]
        qkv = self.qkv_proj(x).view(num_rows, -1, self.head_dim)
        query = ops.rope_store(qkv, self.num_heads, self.num_kv_heads, positions, rotary, kv, slots)
        key_cache, value_cache = kv
        out = attention(query, key_cache, value_cache, scale=self.scale, window=self.window)
        return self.o_proj(out.view(num_rows, -1))


class DecoderLayer(nn.Module):
    def __init__(
        self, config: PretrainedConfig, window: int | None, *, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.self_attn = Attention(config, window, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, dtype=dtype, device=device
        )


class LlamaForServing(nn.Module):
    """One pipeline stage of a Llama-family causal LM (the whole model with the default range)."""

    def __init__(
        self,
        config: PretrainedConfig,
        *,
        layers: range | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {config.model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        device = torch.device(device)
        all_layers = range(config.num_hidden_layers)
        self.layer_range = all_layers if layers is None else layers
        if (
            not self.layer_range
            or self.layer_range.step != 1
            or not set(self.layer_range) <= set(all_layers)
        ):
            raise ValueError(f"layers must be a non-empty range within {all_layers}")
        self.config = config
        self.is_first_stage = self.layer_range.start == 0
        self.is_last_stage = self.layer_range.stop == all_layers.stop
        windows = sliding_windows(config)
        self.windows = [windows[i] for i in self.layer_range]
        self.layers = nn.ModuleList(
            DecoderLayer(config, windows[i], dtype=dtype, device=device) for i in self.layer_range
        )
        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
            if self.is_first_stage
            else None
        )
        self.norm = (
            RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
            if self.is_last_stage
            else None
        )
        self.lm_head = (
            Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
            if self.is_last_stage
            else None
        )
        tied = getattr(config, "tie_word_embeddings", False)
        if tied and self.lm_head is not None and self.embed_tokens is not None:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryTable(config, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:  # the norms keep theirs when the matmuls are packed
        return self.layers[0].input_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].input_layernorm.weight.device

    def pack_weights(self, batch_hint: int = 16) -> bool:
        """On CPU, moves every layer matmul's weight into oneDNN's packed layout (see
        layers.Linear), the LM head's too (a tied one packs a copy: the embedding keeps the
        plain weight for its lookups). Returns whether it packed (not on GPUs, nor for
        dtypes oneDNN emulates)."""
        if not can_pack(self.dtype, self.device):
            return False
        for module in [*self.layers.modules(), self.lm_head]:
            if isinstance(module, Linear) and module.packed is None:
                module.pack(batch_hint)
        return True

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is None:
            raise RuntimeError("only the first pipeline stage embeds tokens")
        return F.embedding(token_ids, self.embed_tokens.weight)

    def forward_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        slots: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        attention: PagedAttention,
        ops: LayerOps,
    ) -> torch.Tensor:
        """This stage's layers over hidden [T, hidden] (updated in place: it is the residual
        stream), writing each row's K/V at `slots` (block ids, offsets) of the pool;
        `attention` is planned for the step already. Each residual add is fused into the norm
        that follows it."""
        delta = None
        for local_index, layer in enumerate(self.layers):
            kv = (kv_cache.keys(local_index), kv_cache.values(local_index))
            normed = ops.add_rms_norm(hidden, delta, layer.input_layernorm)
            delta = layer.self_attn(normed, positions, self.rotary, kv, slots, attention, ops)
            normed = ops.add_rms_norm(hidden, delta, layer.post_attention_layernorm)
            delta = layer.mlp.down_proj(ops.silu_mul(layer.mlp.gate_up_proj(normed)))
        hidden += delta
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab] of the given rows' final hidden states."""
        if self.norm is None or self.lm_head is None:
            raise RuntimeError("only the last pipeline stage computes logits")
        return self.lm_head(self.norm(hidden)).float()
