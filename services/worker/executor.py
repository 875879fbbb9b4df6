"""Executes worker commands against the model runner, and keeps the block ownership ledger.

The ledger is only a check: the scheduler owns allocation, and the worker refuses a step that
would hand one block to two jobs instead of silently corrupting their KV.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.worker.batch import SeqChunk
from services.worker.model_runner import ModelRunner


class CommandError(ValueError):
    """A command the worker cannot execute; the scheduler sees the message."""


@dataclass(frozen=True, slots=True)
class StepOutput:
    tokens: list[tuple[str, int]]  # (job id, sampled token) for seqs that sampled
    forward_s: float


class Executor:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._owner: dict[int, str] = {}  # block id -> job id
        self._blocks_of: dict[str, set[int]] = {}

    @property
    def num_used_blocks(self) -> int:
        return len(self._owner)

    def free(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            for block_id in self._blocks_of.pop(job_id, ()):
                self._owner.pop(block_id, None)

    def reset(self) -> None:
        self._owner.clear()
        self._blocks_of.clear()
        self.runner.reset()

    def step(self, seqs: Sequence[SeqChunk]) -> StepOutput:
        if not seqs:
            return StepOutput(tokens=[], forward_s=0.0)
        self._claim(seqs)
        started = time.perf_counter()
        sampled = self.runner.step(seqs)
        forward_s = time.perf_counter() - started
        tokens = [(seq.job_id, tok) for seq, tok in zip(seqs, sampled, strict=True) if seq.sample]
        return StepOutput(tokens=[(j, t) for j, t in tokens if t is not None], forward_s=forward_s)

    def _claim(self, seqs: Sequence[SeqChunk]) -> None:
        num_blocks, block_size = self.runner.num_blocks, self.runner.block_size
        for seq in seqs:
            if not seq.token_ids:
                raise CommandError(f"seqs[{seq.job_id}].token_ids: empty")
            needed = -(-(seq.start_pos + len(seq.token_ids)) // block_size)
            if len(seq.block_ids) < needed:
                raise CommandError(
                    f"seqs[{seq.job_id}].block_ids: {len(seq.block_ids)} blocks cannot hold "
                    f"{seq.start_pos + len(seq.token_ids)} tokens"
                )
            for block_id in seq.block_ids:
                if not 0 <= block_id < num_blocks:
                    raise CommandError(f"seqs[{seq.job_id}].block_ids: {block_id} out of range")
                owner = self._owner.get(block_id)
                if owner is not None and owner != seq.job_id:
                    raise CommandError(
                        f"seqs[{seq.job_id}].block_ids: block {block_id} belongs to job {owner}"
                    )
        for seq in seqs:
            blocks = self._blocks_of.setdefault(seq.job_id, set())
            for block_id in seq.block_ids:
                self._owner[block_id] = seq.job_id
                blocks.add(block_id)
