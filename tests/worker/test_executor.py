"""Executor.run applies one command, and a job's sampling settings reach the worker once: they
are kept until a free or a reset (not a swap-out), and a chunk without them for a job the worker
does not hold is refused by field. The wire carries them only where the decision does."""

from __future__ import annotations

import pytest

from fastserve.common.v1 import sampling_pb2 as cpb
from fastserve.worker.v1 import worker_pb2 as wpb
from services.common.sampling import SamplingParams
from services.scheduler.convert import decision_to_command
from services.scheduler.core import Decision, ScheduledChunk
from services.worker.batch import SeqChunk
from services.worker.command import BlockMove, Command, Free, Reset, Step
from services.worker.executor import CommandError, Executor
from services.worker.model_runner import ModelRunner
from services.worker.server import command_from_pb

WANTS_LOGPROBS = SamplingParams(temperature=1.0, seed=3, logprobs=True)


class NoStore:
    """A swapper that moves nothing: enough to swap a job out and back in."""

    num_in_flight = 0

    def swap_out(self, job_id, block_ids):
        pass

    def swap_in(self, job_id, block_ids):
        pass

    def settle(self, job_ids):
        pass

    def forget(self, job_ids):
        pass

    def poll(self):
        return []


@pytest.fixture
def executor(tiny_hf_model):
    runner = ModelRunner(tiny_hf_model, num_blocks=8, block_size=16)
    return Executor(runner, NoStore())  # type: ignore[arg-type]


def step(job_id: str, sampling: SamplingParams | None, start: int = 0, **kw) -> Command:
    tokens = [5, 6, 7] if start == 0 else [8]
    chunk = SeqChunk(job_id, tokens, start, [0], True, sampling)
    return Command(action=Step([chunk]), **kw)


def test_settings_are_kept_from_the_first_chunk_until_a_free(executor):
    first = executor.run(step("a", WANTS_LOGPROBS))
    assert not first.error and "a" in first.logprobs and first.num_used_blocks == 1
    kept = executor.run(step("a", None, start=3))
    assert not kept.error and "a" in kept.logprobs  # the settings held since the first chunk
    # A swap-out keeps them: the job comes back without them.
    out = executor.run(Command(swap_out=[BlockMove("a", [0])]))
    assert not out.error and out.num_used_blocks == 0
    back = executor.run(step("a", None, start=4, swap_in=[BlockMove("a", [0])]))
    assert not back.error and "a" in back.logprobs
    freed = executor.run(Command(action=Free(["a"])))
    assert not freed.error and freed.num_used_blocks == 0
    refused = executor.run(step("a", None))
    assert refused.error.startswith("seqs[a].sampling: ")
    again = executor.run(step("a", SamplingParams()))  # a fresh start sends them again
    assert not again.error and "a" not in again.logprobs


def test_free_first_and_reset_forget_the_settings_too(executor):
    assert not executor.run(step("a", WANTS_LOGPROBS)).error
    # Freed first, in the same command: the chunk after the free must carry them again.
    assert executor.run(step("a", None, free_first=["a"])).error.startswith("seqs[a].sampling")
    assert not executor.run(step("a", WANTS_LOGPROBS, free_first=["a"])).error
    assert not executor.run(Command(action=Reset())).error
    assert executor.run(step("a", None)).error.startswith("seqs[a].sampling")


def test_a_failed_command_is_reported_and_the_worker_goes_on(executor):
    bad = Command(action=Step([SeqChunk("a", [5] * 20, 0, [0], True, WANTS_LOGPROBS)]))
    result = executor.run(bad)  # 20 tokens do not fit one block of 16
    assert result.error.startswith("seqs[a].block_ids") and result.num_used_blocks == 0
    assert not executor.run(step("a", WANTS_LOGPROBS)).error


def test_the_wire_carries_settings_only_where_the_decision_has_them():
    def chunk(job_id: str, sampling: SamplingParams | None) -> ScheduledChunk:
        return ScheduledChunk(
            job_id=job_id, token_ids=[5], start_pos=0, block_ids=[0], sample=True,
            sampling=sampling,
        )  # fmt: skip

    decision = Decision(
        iteration_id=7, chunks=[chunk("a", WANTS_LOGPROBS), chunk("b", None)], free_job_ids=["c"]
    )
    message = decision_to_command(decision, decision.iteration_id)
    assert message.command_id == 7
    assert [seq.HasField("sampling") for seq in message.step.seqs] == [True, False]
    command = command_from_pb(message)
    assert isinstance(command.action, Step)
    assert [seq.sampling for seq in command.action.seqs] == [WANTS_LOGPROBS, None]
    assert list(command.free_first) == ["c"]


def test_bad_settings_on_the_wire_are_named_by_field():
    seq = wpb.SeqInput(
        job_id="a", token_ids=[5], block_ids=[0], sampling=cpb.SamplingParams(top_p=2.0)
    )
    with pytest.raises(CommandError, match=r"^seqs\[a\]\.sampling\.top_p: must be in \(0, 1\]"):
        command_from_pb(wpb.Command(step=wpb.Step(seqs=[seq])))
