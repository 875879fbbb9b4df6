"""Launching command k + 1 before collecting command k's tokens (what the worker does on CUDA,
so the host prepares a step while the GPU runs the one before): the same tokens as running the
commands one by one, with chunks `from_last_sample` taking the ids the previous step sampled
while they are still on the device. On CPU a launch computes the whole step, so here this checks
the bookkeeping, not the overlap's speed."""

from __future__ import annotations

from fastserve.common.v1 import sampling_pb2 as cpb
from services.common.sampling import SamplingParams
from services.scheduler.convert import decision_to_command
from services.scheduler.core import Decision, ScheduledChunk
from services.worker.batch import SeqChunk
from services.worker.command import Command, Free, Step
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.server import WorkerServicer
from testing.oracle import hf_greedy

GREEDY = SamplingParams()
LOGPROBS = SamplingParams(logprobs=True, top_logprobs=2)
PROMPTS = {"a": [5, 6, 7, 8], "b": [9, 10], "c": [11, 12, 13, 14, 15, 16]}
TABLES = {"a": [0, 1, 2, 3], "b": [4, 5, 6], "c": [7, 8, 9, 10]}
NUM_DECODES = 8


def commands() -> list[Command]:
    """a and b prefill, then decode from their last samples; b is freed halfway and c joins
    (its prompt in a step with a's decode); a asks for logprobs."""
    settings = {"a": LOGPROBS, "b": GREEDY, "c": GREEDY}
    out = [
        Command(
            action=Step([SeqChunk(j, PROMPTS[j], 0, TABLES[j], True, settings[j]) for j in "ab"])
        )
    ]
    length = {j: len(p) for j, p in PROMPTS.items()}
    running = ["a", "b"]
    for step in range(NUM_DECODES):
        chunks = []
        for job in running:
            chunks.append(SeqChunk(job, [0], length[job], TABLES[job], True, None, True))
            length[job] += 1
        free = []
        if step == 3:
            free, running = ["b"], ["a"]
        if step == 4:
            chunks.append(SeqChunk("c", PROMPTS["c"], 0, TABLES["c"], True, GREEDY))
            running = ["a", "c"]
        out.append(Command(action=Step(chunks)))
        if free:
            out.append(Command(action=Free(free)))
    return out


def make_executor(model) -> Executor:
    return Executor(ModelRunner(model, num_blocks=12, block_size=4))


def outputs(results) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for result in results:
        assert not result.error, result.error
        for job_id, token in result.tokens:
            tokens.setdefault(job_id, []).append(token)
    return tokens


def test_launching_ahead_gives_the_tokens_of_one_by_one(tiny_hf_model):
    one_by_one = make_executor(tiny_hf_model)
    expected = [one_by_one.run(c) for c in commands()]
    ahead = make_executor(tiny_hf_model)
    results, pending = [], None
    for command in commands():
        launched = ahead.launch(command)  # before the previous command's tokens are read
        if pending is not None:
            results.append(ahead.finish(pending))
        pending = launched
    results.append(ahead.finish(pending))
    assert outputs(results) == outputs(expected)
    assert [r.logprobs for r in results] == [r.logprobs for r in expected]
    assert any("a" in r.logprobs for r in results)
    for job_id, tokens in outputs(results).items():
        assert tokens == hf_greedy(tiny_hf_model, PROMPTS[job_id], len(tokens))


def to_pb(command: Command, command_id: int):
    """The wire form of a Step or Free command, as the scheduler sends it."""
    if isinstance(command.action, Free):
        return decision_to_command(
            Decision(command_id, [], list(command.action.job_ids)), command_id
        )
    chunks = [
        ScheduledChunk(
            c.job_id, list(c.token_ids), c.start_pos, list(c.block_ids), c.sample, c.sampling,
            c.from_last_sample,
        )
        for c in command.action.seqs
    ]  # fmt: skip
    return decision_to_command(Decision(command_id, chunks, []), command_id)


def test_the_server_launches_ahead_and_answers_in_order(tiny_hf_model):
    wire = [to_pb(c, i) for i, c in enumerate(commands())]
    sequential = list(
        WorkerServicer(make_executor(tiny_hf_model), None, overlap=False).Run(iter(wire), None)
    )
    executor = make_executor(tiny_hf_model)
    order: list[str] = []
    launch, finish = executor.launch, executor.finish
    executor.launch = lambda c: (order.append("launch"), launch(c))[1]  # type: ignore[method-assign]
    executor.finish = lambda done: (order.append("finish"), finish(done))[1]  # type: ignore[method-assign]
    overlapped = list(WorkerServicer(executor, None, overlap=True).Run(iter(wire), None))
    assert [r.command_id for r in overlapped] == list(range(len(wire)))
    assert [list(r.tokens) for r in overlapped] == [list(r.tokens) for r in sequential]
    assert all(not r.error for r in overlapped)
    # some command was launched while the one before it was still pending
    assert any(order[i : i + 2] == ["launch", "launch"] for i in range(len(order) - 1))
    assert isinstance(overlapped[0].tokens[0].logprobs, cpb.TokenLogprobs)
