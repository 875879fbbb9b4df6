"""One forward step over a batch mixing prefills, prompt chunks and decodes, with the KV cache in
paged blocks.

The model is our own serving module (services/worker/models): fused projections, only this
pipeline stage's layers. A step's tokens of every job are rows of one [T, hidden] tensor, so each
matmul runs once per layer; attention runs once per layer too, over the whole step, reading the
block pool in place (services/worker/attention). The step's index tensors (tokens, positions,
K/V slots, query starts, context lengths, block tables, sampled rows) are packed into one int32
buffer on the host and moved to the device with one copy, then used as views.

The step is staged embed -> layers (any range) -> logits -> sample, so a pipeline-parallel
worker can run just its share (`forward`): stage 0 embeds, the last stage takes logits and
samples. With CUDA graphs on, a decode step runs from the graph of its batch-size bucket
(cuda_graphs.py), its inputs padded into that bucket's static buffer.
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
from services.worker.cuda_graphs import DecodeGraphs
from services.worker.host_to_device import to_device
from services.worker.kv_cache import KVCache
from services.worker.models.llama import LayerOps, LlamaForServing, head_dim, num_kv_heads
from services.worker.models.loader import from_hf
from services.worker.models.ops import NativeOps, TorchOps, TritonOps
from services.worker.sampler import sample

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


@dataclass(slots=True)
class StepInputs:
    """Everything the layers need about a step, as tensors built once and shared by all layers.

    A decode step that runs in a CUDA graph bucket (`bucket`) is padded to the bucket's size:
    its tensors hold `bucket` rows, of which the first `num_rows` are the step's own."""

    token_ids: torch.Tensor  # [T] new tokens of all jobs, job after job
    positions: torch.Tensor  # [T] position of each token in its job
    attention: AttentionMetadata
    sample_rows: torch.Tensor  # [S] the last row of each chunk that samples
    sample_params: list[SamplingParams]
    sample_positions: list[int]  # position the sampled token will take, keys seeded sampling
    sample_seqs: list[int]  # index into the step's chunks of each sampled row
    num_rows: int  # the step's rows, without padding
    bucket: int | None = None  # the decode graph bucket it runs in (None: eagerly)


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
        graph_max_batch: int = 0,
        graph_max_len: int = 0,
        capture_graphs: bool | None = None,
    ) -> None:
        """`model`: a serving model (it holds its own layer range), or a model transformers
        loaded, of which this runner takes `layers` (default: all of them).

        `graph_max_batch` > 0 runs decode steps of up to that many jobs, each with at most
        `graph_max_len` tokens of context (default: the model's length), from CUDA graphs
        captured now (cuda_graphs.py); `capture_graphs=False` runs those padded steps eagerly
        instead (what the tests do on CPU; the default captures on CUDA only)."""
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
            spare_blocks=1,  # the scratch block padding rows write to
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
        self.graphs: DecodeGraphs | None = None
        if graph_max_batch > 0:
            self._start_graphs(graph_max_batch, graph_max_len, capture_graphs)

    def _start_graphs(self, max_batch: int, max_len: int, capture: bool | None) -> None:
        capture = self.device.type == "cuda" if capture is None else capture
        if capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        if capture and not self.attention.graph_safe:
            raise ValueError(
                f"CUDA graphs need the triton attention backend, not {self.attention.name}"
            )
        max_len = max_len or int(getattr(self.config, "max_position_embeddings", 2048))
        width = -(-max_len // self.block_size)
        self.graphs = DecodeGraphs(
            max_batch=max_batch,
            width=width,
            # tokens, positions, slots [size each], sampled rows, starts, lengths, tables
            buffer_size=lambda size: 7 * size + 1 + size * width,
            hidden_size=self.hidden_size,
            dtype=self.model.dtype,
            device=self.device,
            needs_hidden_in=not self.is_first_stage,
            capture=capture,
        )
        scratch = self.kv_cache.scratch_block

        def padding_only(size: int) -> StepInputs:
            seqs = [SeqChunk(f"pad-{i}", [0], 0, [scratch], True) for i in range(size)]
            return self._build(seqs, None, bucket=size)

        with torch.inference_mode():
            self.graphs.capture(padding_only, self._forward_eager)

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
        out = self.forward(inputs)
        results: list[int | None] = [None] * len(seqs)
        if not inputs.sample_seqs:  # only non-final prompt chunks: no logits needed
            return results
        for seq_index, token in zip(inputs.sample_seqs, self.sample(out, inputs), strict=True):
            results[seq_index] = token
        return results

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """This runner's share of a step: embed the tokens (first stage) or take the previous
        stage's `hidden` [num_rows, hidden], run the layers, then return the float32 logits of
        the sampled rows [S, vocab] (last stage, when any samples) or the hidden states
        [num_rows, hidden]. From a CUDA graph where the step has a bucket: the logits are a
        view of the graph's output, which its next replay overwrites (read them first); hidden
        states come as a copy, since sending them to the next stage may still be reading them
        when the next step replays."""
        if inputs.bucket is not None:
            assert self.graphs is not None
            out = self.graphs.run(inputs.bucket, inputs, hidden, self._forward_eager)
            out = out[: inputs.num_rows]
            return out if self.is_last_stage else out.clone()
        return self._forward_eager(inputs, hidden)

    def _forward_eager(self, inputs: StepInputs, hidden: torch.Tensor | None) -> torch.Tensor:
        if hidden is None:
            hidden = self.embed(inputs)
        hidden = self.run_layers(hidden, inputs)
        if self.is_last_stage and inputs.sample_seqs:
            return self.compute_logits(hidden, inputs)
        return hidden

    def prepare(
        self, seqs: Sequence[SeqChunk], held: Mapping[str, SamplingParams] | None = None
    ) -> StepInputs:
        """Validates the chunks and builds the step's index tensors with one host-device copy
        (into a graph bucket's buffer, padded, when the step is a decode step a bucket takes).

        A sampled chunk samples with its own settings, else with those in `held` for its job
        (the Executor's), else greedily."""
        for seq in seqs:
            num_needed = -(-seq.end_pos // self.block_size)
            if len(seq.block_ids) < num_needed:
                raise ValueError(
                    f"job {seq.job_id}: {len(seq.block_ids)} blocks cannot hold "
                    f"{seq.end_pos} tokens of {self.block_size}"
                )
            table = seq.block_ids[:num_needed]
            if min(table) < 0 or max(table) >= self.num_blocks:
                raise ValueError(f"job {seq.job_id}: block id out of [0, {self.num_blocks})")
        bucket = self.graphs.bucket_for(list(seqs), self.block_size) if self.graphs else None
        return self._build(seqs, held, bucket=bucket)

    def _build(
        self,
        seqs: Sequence[SeqChunk],
        held: Mapping[str, SamplingParams] | None,
        *,
        bucket: int | None,
    ) -> StepInputs:
        """Packs the step into one int32 buffer on the host: tokens, positions, slot blocks,
        slot offsets [T each], sampled rows [S], query starts [n + 1], context lengths [n],
        block tables [n, width]; copies it to the device (into the graph bucket's static buffer
        when `bucket` is set) and returns StepInputs as views of it. In a bucket, one-token rows
        on the scratch block fill the step up to the bucket's size and the tables are the
        graphs' width (the bucket's fixed layout; all of its rows sample)."""
        block_size = self.block_size
        num_pad = 0 if bucket is None else bucket - len(seqs)
        num_seqs = len(seqs) + num_pad
        query_lens = [seq.num_tokens for seq in seqs] + [1] * num_pad
        seq_lens = [seq.end_pos for seq in seqs] + [1] * num_pad
        sample_seqs = [i for i, seq in enumerate(seqs) if seq.sample]
        sampled_rows = sample_seqs + list(range(len(seqs), num_seqs))
        tables = [seq.block_ids[: -(-seq.end_pos // block_size)] for seq in seqs]
        static = None
        if bucket is None:
            width = max(len(t) for t in tables)
        else:
            assert self.graphs is not None
            width, static = self.graphs.width, self.graphs.buckets[bucket].buffer
        query_start = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start[1:])
        sizes = [int(query_start[-1])] * 4 + [len(sampled_rows), num_seqs + 1, num_seqs]
        sizes.append(num_seqs * width)
        buffer = np.zeros(sum(sizes), dtype=np.int32)
        parts = np.split(buffer, np.cumsum(sizes)[:-1])
        tokens, positions, slot_blocks, slot_offsets, sample_rows, starts, lens, flat = parts
        tokens[:] = [t for seq in seqs for t in seq.token_ids] + [0] * num_pad
        positions[:] = np.concatenate(
            [np.arange(seq.start_pos, seq.end_pos, dtype=np.int32) for seq in seqs]
            + [np.zeros(num_pad, dtype=np.int32)]
        )
        block_tables = flat.reshape(num_seqs, width)
        for i, table in enumerate(tables):
            block_tables[i, : len(table)] = table
        block_tables[len(seqs) :] = self.kv_cache.scratch_block
        row_seq = np.repeat(np.arange(num_seqs), query_lens)
        slot_blocks[:] = block_tables[row_seq, positions // block_size]
        slot_offsets[:] = positions % block_size
        sample_rows[:] = query_start[1:][sampled_rows] - 1
        starts[:] = query_start
        lens[:] = seq_lens

        views = to_device(buffer, self.device, out=static).split(sizes)
        meta = AttentionMetadata(
            query_start=views[5],
            seq_lens=views[6],
            block_tables=views[7].view(num_seqs, width),
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
            sample_positions=[seqs[i].end_pos for i in sample_seqs],
            sample_seqs=sample_seqs,
            num_rows=sum(query_lens[: len(seqs)]),
            bucket=bucket,
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
