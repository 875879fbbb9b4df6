"""One forward step of a Llama-family model over a batch mixing prefills and decodes, with the
KV cache in paged blocks.

Design: the Hugging Face module supplies the weights and every per-token piece (embedding,
norms, projections, rotary embedding, MLP, lm_head); we replace only attention, because HF's
caches are contiguous per sequence while FastServe's scheduler moves jobs' KV in blocks.
All new tokens of the step are flattened into one [T, hidden] tensor, so the projections and
MLP run as a single batched matmul whatever the mix of jobs. Attention then runs in two
groups, as in vLLM's split of prefill and decode metadata:
- decodes (one query token each) share padded SDPA calls over their gathered block tables,
  with a mask hiding the padding: decode is the step that repeats, so it must not loop per job.
  They are grouped by context length (a group's longest table at most twice its shortest),
  one call per group: padding every decode to the batch's longest context made one long job
  cost a batch of short ones as much as if they were all long (3-4x the attention of
  15 x 40 + 1 x 400 tokens on SmolLM2); with groups the waste stays under 2x at a few calls;
- prefill chunks loop per job; each is long enough to amortise its own call, and a chunk that
  starts mid-prompt (chunked prefill) attends to what earlier chunks left in the cache.

The step is staged embed -> layers (any range) -> logits -> sample, so a pipeline-parallel
worker can run just its share: stage 0 embeds, the last stage takes logits and samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from services.worker.batch import Sampling, SeqChunk
from services.worker.kv_cache import KVCache
from services.worker.sampler import sample

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _num_kv_heads(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


@dataclass(frozen=True, slots=True)
class PrefillSlice:
    """A multi-token chunk of one job: rows [row_start, row_start + num_tokens) of the step."""

    row_start: int
    num_tokens: int
    start_pos: int
    block_table: torch.Tensor  # [1, num_blocks needed]

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_tokens


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Decodes of similar context length, attended in one padded call."""

    rows: torch.Tensor | slice  # their rows in the step; a slice when they are all of them
    block_tables: torch.Tensor  # [B, the group's longest table] padded with block 0
    positions: torch.Tensor  # [B] query position of each


# A decode group's longest block table is at most this many times its shortest.
MAX_DECODE_PADDING = 2


def group_by_length(num_blocks: Sequence[int]) -> list[list[int]]:
    """Indices of `num_blocks` in groups of similar size, shortest first: each group's
    largest is at most MAX_DECODE_PADDING times its smallest."""
    groups: list[list[int]] = []
    for index in sorted(range(len(num_blocks)), key=num_blocks.__getitem__):
        if groups and num_blocks[index] <= MAX_DECODE_PADDING * num_blocks[groups[-1][0]]:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


@dataclass(slots=True)
class StepInputs:
    """Everything the layers need about a step, as tensors built once and shared by all layers."""

    token_ids: torch.Tensor  # [T] new tokens of all jobs, job after job
    positions: torch.Tensor  # [T] position of each token in its job
    slot_blocks: torch.Tensor  # [T] block each token's K/V is written to
    slot_offsets: torch.Tensor  # [T] offset inside that block
    decodes: list[DecodeGroup]  # single-token chunks, grouped by context length
    prefills: list[PrefillSlice]
    sample_rows: torch.Tensor  # [S] the last row of each chunk that samples
    sample_params: list[Sampling]
    sample_positions: list[int]  # position the sampled token will take, keys seeded sampling
    sample_seqs: list[int]  # index into the step's chunks of each sampled row
    # Attention masks by sliding window (None = full causal), built on first use.
    masks: dict[tuple[int, int | None], torch.Tensor | None] = field(default_factory=dict)


class ModelRunner:
    """Runs steps of a Hugging Face Llama/Qwen2/Mistral causal LM against a paged KV cache."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        num_blocks: int,
        block_size: int,
        layers: range | None = None,
    ) -> None:
        """`layers` is the pipeline stage's share of decoder layers (default: all of them)."""
        self.model = model
        self.config = model.config
        self.num_blocks = num_blocks
        self.block_size = block_size
        all_layers = range(len(model.model.layers))
        self.layers = all_layers if layers is None else layers
        if not self.layers or self.layers.step != 1 or not set(self.layers) <= set(all_layers):
            raise ValueError(f"layers must be a non-empty range within {all_layers}")
        self.is_first_stage = self.layers.start == 0
        self.is_last_stage = self.layers.stop == all_layers.stop
        param = next(model.parameters())
        self.device = param.device
        self.kv_cache = KVCache(
            num_blocks=num_blocks,
            block_size=block_size,
            num_layers=len(self.layers),
            num_kv_heads=_num_kv_heads(self.config),
            head_dim=_head_dim(self.config),
            dtype=param.dtype,
            device=self.device,
        )
        # Mistral sets one window for all layers; Qwen2 may set it per layer; Llama has none.
        default_window = getattr(self.config, "sliding_window", None)
        self.windows = [
            getattr(model.model.layers[i].self_attn, "sliding_window", default_window)
            for i in self.layers
        ]

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def drop_other_stages(self) -> None:
        """Frees the weights this stage never runs: other stages' layers, the embeddings past
        stage 0, the LM head before the last stage."""
        layers = self.model.model.layers
        for index in range(len(layers)):
            if index not in self.layers:
                layers[index] = torch.nn.Identity()
        if not self.is_first_stage:  # a tied LM head keeps its own reference to the weight
            self.model.model.embed_tokens = None
        if not self.is_last_stage:
            self.model.lm_head = None

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all of this runner's layers, K and V."""
        return self.kv_cache.block_bytes

    @staticmethod
    def bytes_per_block(
        config: PretrainedConfig, block_size: int, dtype: torch.dtype, num_layers: int | None = None
    ) -> int:
        """Bytes one block takes, to size the pool before allocating it."""
        return KVCache.bytes_per_block(
            block_size=block_size,
            num_layers=config.num_hidden_layers if num_layers is None else num_layers,
            num_kv_heads=_num_kv_heads(config),
            head_dim=_head_dim(config),
            dtype=dtype,
        )

    def reset(self) -> None:
        """Forgets every job's KV (zeroes the pool)."""
        self.kv_cache.clear()

    @torch.inference_mode()
    def step(self, seqs: Sequence[SeqChunk]) -> list[int | None]:
        """Runs one step; returns the sampled token of each chunk (None where sample=False)."""
        if not (self.is_first_stage and self.is_last_stage):
            raise RuntimeError("step() needs the whole model; pipeline stages call the parts")
        if not seqs:
            return []
        inputs = self.prepare(seqs)
        hidden = self.run_layers(self.embed(inputs), inputs)
        results: list[int | None] = [None] * len(seqs)
        if not inputs.sample_seqs:  # only non-final prompt chunks: no logits needed
            return results
        tokens = self.sample(self.compute_logits(hidden, inputs), inputs)
        for seq_index, token in zip(inputs.sample_seqs, tokens, strict=True):
            results[seq_index] = token
        return results

    def prepare(self, seqs: Sequence[SeqChunk]) -> StepInputs:
        """Validates the chunks and builds the step's index tensors."""
        block_size = self.block_size
        tables: list[list[int]] = []
        positions: list[int] = []
        seq_of_row: list[int] = []
        for i, seq in enumerate(seqs):
            num_needed = seq.num_blocks_needed(block_size)
            if len(seq.block_ids) < num_needed:
                raise ValueError(
                    f"job {seq.job_id}: {len(seq.block_ids)} blocks cannot hold "
                    f"{seq.end_pos} tokens of {block_size}"
                )
            table = list(seq.block_ids[:num_needed])
            if min(table) < 0 or max(table) >= self.num_blocks:
                raise ValueError(f"job {seq.job_id}: block id out of [0, {self.num_blocks})")
            tables.append(table)
            positions.extend(range(seq.start_pos, seq.end_pos))
            seq_of_row.extend([i] * seq.num_tokens)

        max_blocks = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])
        cpu_positions = torch.tensor(positions)
        slot_blocks = padded[torch.tensor(seq_of_row), cpu_positions // block_size]

        row_starts = [0]
        for seq in seqs:
            row_starts.append(row_starts[-1] + seq.num_tokens)
        decodes = [i for i, seq in enumerate(seqs) if seq.num_tokens == 1]
        decode_groups = []
        for group in group_by_length([len(tables[i]) for i in decodes]):
            members = [decodes[g] for g in sorted(group)]  # in row order
            # Rows, not seq indices: a decode placed after a prefill chunk starts further down.
            rows: torch.Tensor | slice = (
                slice(0, len(seqs))
                if len(members) == len(seqs)
                else self._to_device([row_starts[i] for i in members])
            )
            num_cols = max(len(tables[i]) for i in members)
            decode_groups.append(
                DecodeGroup(
                    rows=rows,
                    block_tables=padded[members, :num_cols].to(self.device),
                    positions=self._to_device([seqs[i].start_pos for i in members]),
                )
            )
        prefills = [
            PrefillSlice(
                row_start=row_starts[i],
                num_tokens=seq.num_tokens,
                start_pos=seq.start_pos,
                block_table=self._to_device([tables[i]]),
            )
            for i, seq in enumerate(seqs)
            if seq.num_tokens > 1
        ]
        sample_seqs = [i for i, seq in enumerate(seqs) if seq.sample]
        return StepInputs(
            token_ids=self._to_device([t for seq in seqs for t in seq.token_ids]),
            positions=cpu_positions.to(self.device),
            slot_blocks=slot_blocks.to(self.device),
            slot_offsets=(cpu_positions % block_size).to(self.device),
            decodes=decode_groups,
            prefills=prefills,
            sample_rows=self._to_device([row_starts[i + 1] - 1 for i in sample_seqs]),
            sample_params=[seqs[i].sampling for i in sample_seqs],
            sample_positions=[seqs[i].end_pos for i in sample_seqs],
            sample_seqs=sample_seqs,
        )

    @torch.inference_mode()
    def embed(self, inputs: StepInputs) -> torch.Tensor:
        """Stage 0: token embeddings [T, hidden]."""
        return self.model.model.embed_tokens(inputs.token_ids)

    @torch.inference_mode()
    def run_layers(self, hidden: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """Runs this runner's layers over hidden states [T, hidden], filling the KV cache."""
        # One rotary table for the whole step: computed by the model's own module, so rope
        # scaling variants (llama3, yarn, dynamic) match HF.
        cos, sin = self.model.model.rotary_emb(hidden, inputs.positions[None])
        for local_index, layer_index in enumerate(self.layers):
            layer = self.model.model.layers[layer_index]
            attn_in = layer.input_layernorm(hidden)
            hidden = hidden + self._attention(
                local_index, layer.self_attn, attn_in, cos[0], sin[0], inputs
            )
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """Last stage: float32 logits [S, vocab] for the rows that sample, and only those."""
        rows = self.model.model.norm(hidden[inputs.sample_rows])
        return self.model.lm_head(rows).float()

    def sample(self, logits: torch.Tensor, inputs: StepInputs) -> list[int]:
        return sample(logits, inputs.sample_params, inputs.sample_positions)

    def _attention(
        self,
        local_index: int,
        attn: torch.nn.Module,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        inputs: StepInputs,
    ) -> torch.Tensor:
        num_rows = x.shape[0]
        head_dim = attn.head_dim
        query = attn.q_proj(x).view(num_rows, -1, head_dim)
        key = attn.k_proj(x).view(num_rows, -1, head_dim)
        value = attn.v_proj(x).view(num_rows, -1, head_dim)
        query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1)
        self.kv_cache.store(local_index, inputs.slot_blocks, inputs.slot_offsets, key, value)

        window = self.windows[local_index]
        out = torch.empty_like(query)
        for index, group in enumerate(inputs.decodes):
            keys, values = self.kv_cache.gather(local_index, group.block_tables)
            decoded = F.scaled_dot_product_attention(
                query[group.rows].unsqueeze(2),  # [B, heads, 1, head_dim]
                keys,
                values,
                attn_mask=self._decode_mask(inputs, index, window, keys.shape[2]),
                scale=attn.scaling,
                enable_gqa=True,
            )
            out[group.rows] = decoded.squeeze(2)
        for index, chunk in enumerate(inputs.prefills):
            keys, values = self.kv_cache.gather(local_index, chunk.block_table)
            rows = slice(chunk.row_start, chunk.row_start + chunk.num_tokens)
            mask = self._prefill_mask(inputs, index, window)
            prefilled = F.scaled_dot_product_attention(
                query[rows].transpose(0, 1).unsqueeze(0),  # [1, heads, n, head_dim]
                keys[:, :, : chunk.end_pos],
                values[:, :, : chunk.end_pos],
                attn_mask=mask,
                # Top-left aligned causal mask: right only when the chunk starts the sequence.
                is_causal=mask is None,
                scale=attn.scaling,
                enable_gqa=True,
            )
            out[rows] = prefilled[0].transpose(0, 1)
        return attn.o_proj(out.reshape(num_rows, -1))

    def _decode_mask(
        self, inputs: StepInputs, index: int, window: int | None, num_keys: int
    ) -> torch.Tensor:
        cache_key = (-1 - index, window)  # prefill chunks use indices >= 0
        if cache_key not in inputs.masks:
            key_pos = torch.arange(num_keys, device=self.device)[None, :]
            query_pos = inputs.decodes[index].positions[:, None]
            mask = _causal(key_pos, query_pos, window)
            inputs.masks[cache_key] = mask[:, None, None, :]  # [B, 1, 1, num_keys]
        return inputs.masks[cache_key]

    def _prefill_mask(
        self, inputs: StepInputs, index: int, window: int | None
    ) -> torch.Tensor | None:
        cache_key = (index, window)
        if cache_key not in inputs.masks:
            chunk = inputs.prefills[index]
            mask = None
            if chunk.start_pos > 0 or (window is not None and window < chunk.end_pos):
                key_pos = torch.arange(chunk.end_pos, device=self.device)[None, :]
                query_pos = torch.arange(chunk.start_pos, chunk.end_pos, device=self.device)[
                    :, None
                ]
                mask = _causal(key_pos, query_pos, window)
            inputs.masks[cache_key] = mask
        return inputs.masks[cache_key]

    def _to_device(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device)


def _causal(key_pos: torch.Tensor, query_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query sees: those at or before it, within the sliding window if any."""
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask
