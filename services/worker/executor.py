"""Executes worker commands against the model runner, and keeps the block ownership ledger
and each job's sampling settings.

The ledger is only a check: the scheduler owns allocation, and the worker refuses a step that
would hand one block to two jobs instead of silently corrupting their KV. Sampling settings
come once per job (with its first chunk after the worker last forgot it, see worker.proto) and
are kept until a free or a reset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from services.common.sampling import SamplingParams, TokenLogprobs
from services.worker.batch import SeqChunk
from services.worker.command import Command, CommandResult, Free, Reset, Step, SwapDone
from services.worker.model_runner import ModelRunner
from services.worker.pipeline import StageGroup
from services.worker.sampler import logprobs
from services.worker.swapper import Swapper

log = logging.getLogger(__name__)


class CommandError(ValueError):
    """A command the worker cannot execute; the scheduler sees the message."""


@dataclass(frozen=True, slots=True)
class StepOutput:
    tokens: list[tuple[str, int]]  # (job id, sampled token) for seqs that sampled (last stage)
    forward_s: float  # this stage's compute, without the wait for the previous stage
    wait_s: float = 0.0  # waiting for the previous stage's activations
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # jobs that asked


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
        self._last_sampled: dict[str, int] = {}  # job id -> the token the last step sampled

    @property
    def num_used_blocks(self) -> int:
        return len(self._holders)

    def run(self, command: Command) -> CommandResult:
        """Applies one command: frees, swap-outs, swap-ins, then its action. A command that
        fails (a malformed one names its field) comes back with `error` set; the swaps that
        finished meanwhile are reported either way."""
        started = time.perf_counter()
        output = StepOutput(tokens=[], forward_s=0.0)
        error = ""
        try:
            self.free(command.free_first)
            for move in command.swap_out:
                self.swap_out(move.job_id, move.block_ids)
            for move in command.swap_in:
                self.swap_in(move.job_id, move.block_ids)
            action = command.action
            if isinstance(action, Step):
                output = self.step(action.seqs)
            elif isinstance(action, Free):
                self.free(action.job_ids)
            elif isinstance(action, Reset):
                self.reset(action.pipeline_id)
        except ValueError as exc:  # CommandError among them: a malformed command
            error = str(exc)
        except Exception as exc:  # one bad command must not kill the worker
            log.exception("command failed")
            error = f"internal error: {type(exc).__name__}: {exc}"
        return CommandResult(
            tokens=output.tokens,
            logprobs=output.logprobs,
            forward_s=output.forward_s,
            wait_s=output.wait_s,
            total_s=time.perf_counter() - started,
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
            self._last_sampled.pop(job_id, None)

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
        self._last_sampled.clear()
        self.runner.reset()
        if self.stages is not None:
            self.stages.form(pipeline_id)

    def step(self, seqs: Sequence[SeqChunk]) -> StepOutput:
        if not seqs:
            return StepOutput(tokens=[], forward_s=0.0)
        seqs = self._fill_last_samples(seqs)
        self._claim(seqs)
        self._take_sampling(seqs)
        output = self._stage_step(seqs, self.stages)
        self._last_sampled = dict(output.tokens)
        return output

    def _fill_last_samples(self, seqs: Sequence[SeqChunk]) -> list[SeqChunk]:
        """Async decoding: a chunk `from_last_sample` runs the token this worker sampled for
        its job in the previous step."""
        filled = []
        for seq in seqs:
            if seq.from_last_sample:
                if self.stages is not None:
                    raise CommandError(
                        f"seqs[{seq.job_id}].from_last_sample: only with one pipeline stage"
                    )
                token = self._last_sampled.get(seq.job_id)
                if token is None:
                    raise CommandError(
                        f"seqs[{seq.job_id}].from_last_sample: the previous step sampled no "
                        "token for this job"
                    )
                seq = replace(seq, token_ids=[token], from_last_sample=False)
            filled.append(seq)
        return filled

    def _stage_step(self, seqs: Sequence[SeqChunk], stages: StageGroup | None) -> StepOutput:
        """This stage's share of a step (the whole model when `stages` is None): embed or
        receive, run its layers, then send on or sample. Every stage builds the same step
        inputs from the same command."""
        runner = self.runner
        started = time.perf_counter()
        inputs = runner.prepare(seqs, self._sampling)
        wait_s = 0.0
        hidden = None
        if stages is not None and not stages.is_first:
            waiting = time.perf_counter()
            hidden = stages.recv_previous(
                inputs.num_rows, runner.hidden_size, runner.kv_cache.dtype
            )
            wait_s = time.perf_counter() - waiting
        out = runner.forward(inputs, hidden)
        tokens: list[tuple[str, int]] = []
        job_logprobs: dict[str, TokenLogprobs] = {}
        if stages is not None and not stages.is_last:
            stages.send_next(out)
        elif inputs.sample_seqs:
            sampled = runner.sample(out, inputs)
            job_ids = [seqs[i].job_id for i in inputs.sample_seqs]
            tokens = list(zip(job_ids, sampled, strict=True))
            for job_id, lp in zip(
                job_ids, logprobs(out, sampled, inputs.sample_params), strict=True
            ):
                if lp is not None:
                    job_logprobs[job_id] = lp
        forward_s = time.perf_counter() - started - wait_s
        return StepOutput(tokens=tokens, forward_s=forward_s, wait_s=wait_s, logprobs=job_logprobs)

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
