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


def test_jobs_share_full_blocks_read_only_and_never_write_one_another_holds(tiny_hf_model):
    """The prefix cache's rule on the worker: a job's table may start with blocks another job
    holds; it reads them as they are (the same next token as computing them itself), and a
    command that would write, or swap out, a block another job holds is refused by field."""
    greedy = SamplingParams()
    prefix, own_b = list(range(3, 35)), [40, 41, 42]  # two full blocks of 16, then b's own
    shared = Executor(ModelRunner(tiny_hf_model, num_blocks=8, block_size=16), NoStore())
    a = SeqChunk("a", [*prefix, 50], 0, [0, 1, 2], True, greedy)
    assert not shared.run(Command(action=Step([a]))).error
    b = SeqChunk("b", own_b, len(prefix), [0, 1, 3], True, greedy)  # reads 0 and 1, writes 3
    result = shared.run(Command(action=Step([b])))
    assert not result.error and result.num_used_blocks == 4
    alone = Executor(ModelRunner(tiny_hf_model, num_blocks=8, block_size=16), NoStore())
    whole = SeqChunk("b", [*prefix, *own_b], 0, [4, 5, 6], True, greedy)
    assert alone.run(Command(action=Step([whole]))).tokens == result.tokens
    overwrite = SeqChunk("c", [7] * 5, 16, [0, 1], True, greedy)  # writes block 1: a's and b's
    refused = shared.run(Command(action=Step([overwrite])))
    assert refused.error.startswith("seqs[c].block_ids: block 1 is held by job a")
    swapped = shared.run(Command(swap_out=[BlockMove("b", [0])]))
    assert swapped.error.startswith("swap_out[b].block_ids: block 0 is held by job a")
    assert not shared.run(Command(swap_out=[BlockMove("b", [3])])).error  # its own block
    freed = shared.run(Command(action=Free(["a"])))
    assert not freed.error and freed.num_used_blocks == 0


def test_a_chunk_from_the_last_sample_runs_the_token_the_worker_sampled(executor, tiny_hf_model):
    """Async decoding: the same steps give the same tokens whether the scheduler sends the
    sampled token or asks the worker to run the one it sampled; the flag survives the wire."""
    greedy = SamplingParams()
    first = executor.run(step("a", greedy))
    ((job_id, token),) = first.tokens
    assert job_id == "a"
    ahead = SeqChunk("a", [0], 3, [0], True, None, from_last_sample=True)
    (wire,) = command_from_pb(
        decision_to_command(
            Decision(1, [ScheduledChunk("a", [0], 3, [0], True, None, True)], []), 1
        )
    ).action.seqs
    assert wire == ahead
    by_worker = executor.run(Command(action=Step([ahead])))
    reference = Executor(ModelRunner(tiny_hf_model, num_blocks=8, block_size=16), NoStore())
    reference.run(step("a", greedy))
    told = reference.run(Command(action=Step([SeqChunk("a", [token], 3, [0], True, None)])))
    assert not by_worker.error and by_worker.tokens == told.tokens
    # Nothing sampled for the job in the previous step: refused, naming the field.
    assert executor.run(Command(action=Free(["a"]))).error == ""
    assert executor.run(step("b", greedy)).error == ""
    orphan = SeqChunk("a", [0], 3, [0], True, greedy, from_last_sample=True)
    refused = executor.run(Command(action=Step([orphan])))
    assert refused.error.startswith("seqs[a].from_last_sample: ")
