"""One forward step over a batch mixing prefills, prompt chunks and decodes, with the KV cache in
paged blocks.

The model is our own serving module (services/worker/models): fused projections, only this
pipeline stage's layers. A step's tokens of every job are rows of one [T, hidden] tensor, so each
matmul runs once per layer; attention runs once per layer too, over the whole step, reading the
block pool in place (services/worker/attention). The step's index tensors (tokens, positions,
K/V slots, query starts, context lengths, block tables, sampled rows) are packed into one int32
buffer on the host and moved to the device with one copy, then used as views.

The step is staged embed -> layers (any range) -> logits -> sample, so a pipeline-parallel
worker can run just its share: stage 0 embeds, the last stage takes logits and samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from services.common.sampling import GREEDY, SamplingParams
from services.worker import native
from services.worker.attention import AttentionMetadata, PagedAttention
from services.worker.batch import SeqChunk
from services.worker.kv_cache import KVCache
from services.worker.models.llama import LayerOps, LlamaForServing, head_dim, num_kv_heads
from services.worker.models.loader import from_hf
from services.worker.models.ops import NativeOps, TorchOps, TritonOps
from services.worker.sampler import sample

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


@dataclass(slots=True)
class StepInputs:
    """Everything the layers need about a step, as tensors built once and shared by all layers."""

    token_ids: torch.Tensor  # [T] new tokens of all jobs, job after job
    positions: torch.Tensor  # [T] position of each token in its job
    attention: AttentionMetadata
    sample_rows: torch.Tensor  # [S] the last row of each chunk that samples
    sample_params: list[SamplingParams]
    sample_positions: list[int]  # position the sampled token will take, keys seeded sampling
    sample_seqs: list[int]  # index into the step's chunks of each sampled row

    @property
    def num_rows(self) -> int:
        return int(self.token_ids.shape[0])


class ModelRunner:
    """Runs steps of a Llama/Qwen2/Mistral causal LM against a paged KV cache."""

    def __init__(
        self,
        model: LlamaForServing | PreTrainedModel,
        *,
        num_blocks: int,
        block_size: int,
        layers: range | None = None,
        attention_backend: str = "auto",
    ) -> None:
        """`model`: a serving model (it holds its own layer range), or a model transformers
        loaded, of which this runner takes `layers` (default: all of them)."""
        if not isinstance(model, LlamaForServing):
            model = from_hf(model, layers)
        elif layers is not None and layers != model.layer_range:
            raise ValueError(f"the model holds layers {model.layer_range}, not {layers}")
        self.model = model
        self.config = model.config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layers = model.layer_range
        self.is_first_stage = model.is_first_stage
        self.is_last_stage = model.is_last_stage
        self.device = model.device
        self.kv_cache = KVCache(
            num_blocks=num_blocks,
            block_size=block_size,
            num_layers=len(self.layers),
            num_kv_heads=num_kv_heads(self.config),
            head_dim=head_dim(self.config),
            dtype=model.dtype,
            device=self.device,
        )
        self.attention = PagedAttention(
            attention_backend,
            self.device,
            num_heads=self.config.num_attention_heads,
            num_kv_heads=num_kv_heads(self.config),
        )
        # `reference` is plain torch throughout (the tests' yardstick). Otherwise the layer ops
        # go with the attention kernel (native C++ on CPU, Triton on CUDA), and on CPU the
        # matmuls' weights are packed for oneDNN (layers.Linear) even where no compiler built
        # the kernels.
        library = native.library() if self.attention.name == "cpu-kernel" else None
        self.ops: LayerOps = (
            NativeOps(library)
            if library is not None
            else TritonOps()
            if self.attention.name == "triton"
            else TorchOps()
        )
        self.packed = attention_backend != "reference" and model.pack_weights(batch_hint=16)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

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
            num_kv_heads=num_kv_heads(config),
            head_dim=head_dim(config),
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

    def prepare(
        self, seqs: Sequence[SeqChunk], held: Mapping[str, SamplingParams] | None = None
    ) -> StepInputs:
        """Validates the chunks and builds the step's index tensors with one host-device copy.

        A sampled chunk samples with its own settings, else with those in `held` for its job
        (the Executor's), else greedily."""
        block_size = self.block_size
        num_seqs = len(seqs)
        query_lens = [seq.num_tokens for seq in seqs]
        seq_lens = [seq.end_pos for seq in seqs]
        tables: list[Sequence[int]] = []
        for seq in seqs:
            num_needed = -(-seq.end_pos // block_size)
            if len(seq.block_ids) < num_needed:
                raise ValueError(
                    f"job {seq.job_id}: {len(seq.block_ids)} blocks cannot hold "
                    f"{seq.end_pos} tokens of {block_size}"
                )
            table = seq.block_ids[:num_needed]
            if min(table) < 0 or max(table) >= self.num_blocks:
                raise ValueError(f"job {seq.job_id}: block id out of [0, {self.num_blocks})")
            tables.append(table)
        num_rows = sum(query_lens)
        max_blocks = max(len(t) for t in tables)
        sample_seqs = [i for i, seq in enumerate(seqs) if seq.sample]
        query_start = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start[1:])

        # One int32 buffer: tokens, positions, slot blocks, slot offsets [T each], sampled rows
        # [S], query starts [n + 1], context lengths [n], block tables [n, max_blocks].
        sizes = [num_rows] * 4 + [len(sample_seqs), num_seqs + 1, num_seqs, num_seqs * max_blocks]
        buffer = np.zeros(sum(sizes), dtype=np.int32)
        parts = np.split(buffer, np.cumsum(sizes)[:-1])
        tokens, positions, slot_blocks, slot_offsets, sample_rows, starts, lens, flat = parts
        tokens[:] = [t for seq in seqs for t in seq.token_ids]
        positions[:] = np.concatenate(
            [np.arange(seq.start_pos, seq.end_pos, dtype=np.int32) for seq in seqs]
        )
        block_tables = flat.reshape(num_seqs, max_blocks)
        for i, table in enumerate(tables):
            block_tables[i, : len(table)] = table
        row_seq = np.repeat(np.arange(num_seqs), query_lens)
        slot_blocks[:] = block_tables[row_seq, positions // block_size]
        slot_offsets[:] = positions % block_size
        sample_rows[:] = query_start[1:][sample_seqs] - 1
        starts[:] = query_start
        lens[:] = seq_lens

        device_buffer = torch.from_numpy(buffer).to(self.device, non_blocking=True)
        views = device_buffer.split(sizes)
        meta = AttentionMetadata(
            query_start=views[5],
            seq_lens=views[6],
            block_tables=views[7].view(num_seqs, max_blocks),
            slot_blocks=views[2],
            slot_offsets=views[3],
            query_lens_host=tuple(query_lens),
            seq_lens_host=tuple(seq_lens),
        )
        return StepInputs(
            token_ids=views[0],
            positions=views[1],
            attention=meta,
            sample_rows=views[4],
            sample_params=[_sampling_of(seqs[i], held) for i in sample_seqs],
            sample_positions=[seq_lens[i] for i in sample_seqs],
            sample_seqs=sample_seqs,
        )

    @torch.inference_mode()
    def embed(self, inputs: StepInputs) -> torch.Tensor:
        """Stage 0: token embeddings [T, hidden]."""
        return self.model.embed(inputs.token_ids)

    @torch.inference_mode()
    def run_layers(self, hidden: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """Runs this runner's layers over hidden states [T, hidden], filling the KV cache."""
        self.attention.plan(inputs.attention)
        slots = (inputs.attention.slot_blocks, inputs.attention.slot_offsets)
        return self.model.forward_layers(
            hidden, inputs.positions, slots, self.kv_cache, self.attention, self.ops
        )

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """Last stage: float32 logits [S, vocab] for the rows that sample, and only those."""
        return self.model.logits(hidden[inputs.sample_rows])

    def sample(self, logits: torch.Tensor, inputs: StepInputs) -> list[int]:
        return sample(logits, inputs.sample_params, inputs.sample_positions)


def _sampling_of(seq: SeqChunk, held: Mapping[str, SamplingParams] | None) -> SamplingParams:
    if seq.sampling is not None:
        return seq.sampling
    return held[seq.job_id] if held is not None else GREEDY
