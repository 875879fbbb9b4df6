"""Executes worker commands against the model runner, and keeps the block ownership ledger
and each job's sampling settings.

A command runs in two halves: `launch` applies it and queues its step on the device (on a GPU
the kernels run while the host goes on), `finish` waits for the sampled tokens and reports.
`run` is both at once. The server launches command k+1 before finishing command k where the
device runs asynchronously (CUDA), so the host prepares the next step while the GPU runs this
one; a chunk `from_last_sample` then takes its token from the previous step's sampled ids on
the device, which the host has not seen yet (async decoding, as vLLM's).

The ledger is only a check: the scheduler owns allocation, and the worker refuses a step that
would hand one block to two jobs instead of silently corrupting their KV. Sampling settings
come once per job (with its first chunk after the worker last forgot it, see worker.proto) and
are kept until a free or a reset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from services.common.sampling import SamplingParams, TokenLogprobs
from services.worker.batch import SeqChunk
from services.worker.command import Command, CommandResult, Free, Reset, Step, SwapDone
from services.worker.host_to_device import to_device
from services.worker.model_runner import ModelRunner
from services.worker.pipeline import StageGroup
from services.worker.sampler import logprobs, sample_ids
from services.worker.swapper import Swapper

log = logging.getLogger(__name__)


class CommandError(ValueError):
    """A command the worker cannot execute; the scheduler sees the message."""


@dataclass(slots=True)
class Launched:
    """A command applied, its step queued on the device; `Executor.finish` completes it."""

    started: float
    busy_s: float = 0.0  # host time spent on it so far (launching)
    forward_s: float = 0.0  # of which the step's, less `wait_s` (finish adds the wait for ids)
    wait_s: float = 0.0  # waiting for the previous stage's activations
    job_ids: list[str] = field(default_factory=list)  # jobs that sampled, in row order
    ids: torch.Tensor | None = None  # their sampled token ids, on the device
    logits: torch.Tensor | None = None  # a copy, when some row asked for logprobs
    params: list[SamplingParams] = field(default_factory=list)
    error: str = ""


class Executor:
    def __init__(
        self,
        runner: ModelRunner,
        swapper: Swapper | None = None,
        stages: StageGroup | None = None,
    ) -> None:
        """`stages`: this worker is one of several pipeline stages (None: the whole model)."""
        self.runner = runner
        self.swapper = swapper
        self.stages = stages
        self._holders: dict[int, set[str]] = {}  # block id -> jobs whose tables hold it
        self._blocks_of: dict[str, set[int]] = {}
        self._sampling: dict[str, SamplingParams] = {}  # job id -> its settings, once sent
        # The last step's sampled ids, on the device, and each job's row in them.
        self._last_ids: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}

    @property
    def num_used_blocks(self) -> int:
        return len(self._holders)

    def run(self, command: Command) -> CommandResult:
        """Applies one command and waits for its result (`launch` then `finish`)."""
        return self.finish(self.launch(command))

    def launch(self, command: Command) -> Launched:
        """Applies one command: frees, swap-outs, swap-ins, then its action, a step queued on
        the device. A command that fails (a malformed one names its field) gets `error` set."""
        launched = Launched(started=time.perf_counter())
        try:
            self.free(command.free_first)
            for move in command.swap_out:
                self.swap_out(move.job_id, move.block_ids)
            for move in command.swap_in:
                self.swap_in(move.job_id, move.block_ids)
            action = command.action
            if isinstance(action, Step):
                self._launch_step(action.seqs, launched)
            elif isinstance(action, Free):
                self.free(action.job_ids)
            elif isinstance(action, Reset):
                self.reset(action.pipeline_id)
        except ValueError as exc:  # CommandError among them: a malformed command
            launched.error = str(exc)
        except Exception as exc:  # one bad command must not kill the worker
            log.exception("command failed")
            launched.error = f"internal error: {type(exc).__name__}: {exc}"
        launched.busy_s = time.perf_counter() - launched.started
        return launched

    def finish(self, launched: Launched) -> CommandResult:
        """Waits for a launched command's sampled tokens (one device-to-host copy) and reports
        it with the swaps that finished meanwhile."""
        started = time.perf_counter()
        tokens: list[tuple[str, int]] = []
        job_logprobs: dict[str, TokenLogprobs] = {}
        error = launched.error
        if launched.ids is not None and not error:
            try:
                sampled: list[int] = launched.ids.tolist()
                tokens = list(zip(launched.job_ids, sampled, strict=True))
                if launched.logits is not None:
                    found = logprobs(launched.logits, sampled, launched.params)
                    for job_id, lp in zip(launched.job_ids, found, strict=True):
                        if lp is not None:
                            job_logprobs[job_id] = lp
            except Exception as exc:  # a failed kernel surfaces here, at the sync
                log.exception("step failed")
                error, tokens = f"internal error: {type(exc).__name__}: {exc}", []
        finish_s = time.perf_counter() - started
        return CommandResult(
            tokens=tokens,
            logprobs=job_logprobs,
            forward_s=launched.forward_s + (finish_s if launched.ids is not None else 0.0),
            wait_s=launched.wait_s,
            total_s=launched.busy_s + finish_s,
            swaps_done=self.poll_swaps(),
            num_swaps_in_flight=self.num_swaps_in_flight,
            num_used_blocks=self.num_used_blocks,
            error=error,
        )

    def free(self, job_ids: Iterable[str]) -> None:
        """Releases jobs' device blocks, drops any kvstore copy of their KV, and forgets their
        sampling settings."""
        job_ids = list(job_ids)
        if self.swapper is not None:
            self.swapper.settle(job_ids)  # a swap-in still writing their blocks finishes first
        self._release(job_ids)
        if self.swapper is not None:
            self.swapper.forget(job_ids)
        for job_id in job_ids:
            self._sampling.pop(job_id, None)
            self._last_rows.pop(job_id, None)

    def _release(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            for block_id in self._blocks_of.pop(job_id, ()):
                holders = self._holders[block_id]
                holders.discard(job_id)
                if not holders:
                    del self._holders[block_id]

    def swap_out(self, job_id: str, block_ids: Sequence[int]) -> None:
        """Copies a job's blocks off the device now and to the kvstore in the background; the
        blocks are released at once (the scheduler may hand them to another job)."""
        if self.swapper is None:
            raise CommandError("swap_out: this worker has no kvstore (--kvstore-address)")
        self._check_range(job_id, block_ids, "swap_out")
        self._check_writable(job_id, block_ids, "swap_out")
        self.swapper.swap_out(job_id, block_ids)
        self._release([job_id])

    def swap_in(self, job_id: str, block_ids: Sequence[int]) -> None:
        """Starts reading a job's blocks back from the kvstore into `block_ids`."""
        if self.swapper is None:
            raise CommandError("swap_in: this worker has no kvstore (--kvstore-address)")
        self._check_range(job_id, block_ids, "swap_in")
        self._check_writable(job_id, block_ids, "swap_in")
        self._hold(job_id, block_ids)
        self.swapper.swap_in(job_id, block_ids)

    def poll_swaps(self) -> list[SwapDone]:
        return self.swapper.poll() if self.swapper is not None else []

    @property
    def num_swaps_in_flight(self) -> int:
        return self.swapper.num_in_flight if self.swapper is not None else 0

    def _check_range(self, job_id: str, block_ids: Sequence[int], field: str) -> None:
        for block_id in block_ids:
            if not 0 <= block_id < self.runner.num_blocks:
                raise CommandError(f"{field}[{job_id}].block_ids: {block_id} out of range")

    def _check_writable(self, job_id: str, block_ids: Sequence[int], field: str) -> None:
        """A job writes, or swaps out, only blocks no other job holds: blocks shared through
        the prefix cache are read-only while jobs hold them. (A swap-out of blocks nobody
        holds is the prefix cache keeping cached blocks in the kvstore.)"""
        for block_id in block_ids:
            others = self._holders.get(block_id, set()) - {job_id}
            if others:
                raise _shared_write(field, job_id, block_id, others)

    def _hold(self, job_id: str, block_ids: Iterable[int]) -> None:
        blocks = self._blocks_of.setdefault(job_id, set())
        for block_id in block_ids:
            self._holders.setdefault(block_id, set()).add(job_id)
            blocks.add(block_id)

    def reset(self, pipeline_id: str = "") -> None:
        """Forgets every job's blocks and sampling settings; with pipeline stages, (re)forms
        the stage group."""
        if self.swapper is not None:
            self.swapper.poll()  # results for a previous scheduler connection: stale
        self._holders.clear()
        self._blocks_of.clear()
        self._sampling.clear()
        self._last_rows.clear()
        self._last_ids = None
        self.runner.reset()
        if self.stages is not None:
            self.stages.form(pipeline_id)

    def _launch_step(self, seqs: Sequence[SeqChunk], launched: Launched) -> None:
        """This stage's share of a step (the whole model without pipeline stages): embed or
        receive, run its layers, then send on or sample on the device. Every stage builds the
        same step inputs from the same command."""
        if not seqs:
            return
        step_started = time.perf_counter()
        try:
            self._run_step(seqs, launched)
        finally:
            launched.forward_s = time.perf_counter() - step_started - launched.wait_s

    def _run_step(self, seqs: Sequence[SeqChunk], launched: Launched) -> None:
        fills = self._last_sample_rows(seqs)
        self._claim(seqs)
        self._take_sampling(seqs)
        runner, stages = self.runner, self.stages
        inputs = runner.prepare(seqs, self._sampling)
        if fills:  # the previous step's ids, still on the device, into this step's tokens
            assert self._last_ids is not None
            index = to_device(np.array(fills, dtype=np.int64).T.copy(), runner.device)
            inputs.token_ids[index[0]] = self._last_ids[index[1]].to(inputs.token_ids.dtype)
        hidden = None
        if stages is not None and not stages.is_first:
            waiting = time.perf_counter()
            hidden = stages.recv_previous(
                inputs.num_rows, runner.hidden_size, runner.kv_cache.dtype
            )
            launched.wait_s = time.perf_counter() - waiting
        out = runner.forward(inputs, hidden)
        self._last_ids, self._last_rows = None, {}  # until this step's ids exist
        if stages is not None and not stages.is_last:
            stages.send_next(out)
            return
        if not inputs.sample_seqs:
            return
        launched.ids = sample_ids(out, inputs.sample_params, inputs.sample_positions)
        launched.job_ids = [seqs[i].job_id for i in inputs.sample_seqs]
        launched.params = inputs.sample_params
        if any(p.logprobs for p in inputs.sample_params):
            # a graph's output is overwritten by its next replay, which may come first
            launched.logits = out.clone() if inputs.bucket is not None else out
        self._last_ids = launched.ids
        self._last_rows = {job_id: row for row, job_id in enumerate(launched.job_ids)}

    def _last_sample_rows(self, seqs: Sequence[SeqChunk]) -> list[tuple[int, int]]:
        """Async decoding: (row in this step, row in the last step's ids) of each chunk
        `from_last_sample`, which runs the token this worker sampled for its job last step."""
        fills = []
        row = 0
        for seq in seqs:
            if seq.from_last_sample:
                if self.stages is not None:
                    raise CommandError(
                        f"seqs[{seq.job_id}].from_last_sample: only with one pipeline stage"
                    )
                last_row = self._last_rows.get(seq.job_id)
                if last_row is None or seq.num_tokens != 1:
                    raise CommandError(
                        f"seqs[{seq.job_id}].from_last_sample: the previous step sampled no "
                        "token for this job"
                        if last_row is None
                        else f"seqs[{seq.job_id}].from_last_sample: a one-token chunk only"
                    )
                fills.append((row, last_row))
            row += seq.num_tokens
        return fills

    def _claim(self, seqs: Sequence[SeqChunk]) -> None:
        block_size = self.runner.block_size
        for seq in seqs:
            if not seq.token_ids:
                raise CommandError(f"seqs[{seq.job_id}].token_ids: empty")
            needed = -(-(seq.start_pos + len(seq.token_ids)) // block_size)
            if len(seq.block_ids) < needed:
                raise CommandError(
                    f"seqs[{seq.job_id}].block_ids: {len(seq.block_ids)} blocks cannot hold "
                    f"{seq.start_pos + len(seq.token_ids)} tokens"
                )
        # The step's tables join the ledger; each chunk writes from its first new position on,
        # and those blocks must be its alone (the ones before may be shared, read-only).
        in_step: dict[int, set[str]] = {}
        for seq in seqs:
            self._check_range(seq.job_id, seq.block_ids, "seqs")
            for block_id in seq.block_ids:
                in_step.setdefault(block_id, set()).add(seq.job_id)
        for seq in seqs:
            needed = -(-(seq.start_pos + len(seq.token_ids)) // block_size)
            for block_id in seq.block_ids[seq.start_pos // block_size : needed]:
                others = (self._holders.get(block_id, set()) | in_step[block_id]) - {seq.job_id}
                if others:
                    raise _shared_write("seqs", seq.job_id, block_id, others)
        for seq in seqs:
            self._hold(seq.job_id, seq.block_ids)

    def _take_sampling(self, seqs: Sequence[SeqChunk]) -> None:
        """Records the settings that came with chunks; a chunk without them must be of a job
        whose settings this worker holds."""
        held = self._sampling
        for seq in seqs:
            if seq.sampling is None and seq.job_id not in held:
                raise CommandError(
                    f"seqs[{seq.job_id}].sampling: required on a job's first chunk after the "
                    "worker last freed or reset it; this worker holds none for the job"
                )
        for seq in seqs:
            if seq.sampling is not None:
                held[seq.job_id] = seq.sampling


def _shared_write(field: str, job_id: str, block_id: int, others: set[str]) -> CommandError:
    return CommandError(
        f"{field}[{job_id}].block_ids: block {block_id} is held by job {min(others)}; "
        "a job writes only blocks no other job holds"
    )
