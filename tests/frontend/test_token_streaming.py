"""One delta, one SSE chunk and one gRPC message per generated token (issue 14).

The scheduler sends a frontend one message per iteration, with at most one token per job; the
frontend must hand each token to its client on its own, whatever piled up before the request's
task woke, so that clients and benchmarks see every token's time. The only merge allowed is a
token whose text is held back: the bytes of an incomplete UTF-8 character, or a tail that may
begin a stop string; its id, logprob and text go out with the next token.

First the generation core on a scripted scheduler link (no processes), then a real frontend
(`Frontend.start`) in this process against a scripted scheduler over gRPC, read through OpenAI
SSE and gRPC `Generate`. Token ids are SmolLM2's (the tiny model's tokenizer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence

import aiohttp
import grpc

from fastserve.common.v1 import sampling_pb2 as cpb
from fastserve.scheduler.v1 import scheduler_pb2 as spb
from fastserve.scheduler.v1 import scheduler_pb2_grpc
from fastserve.v1 import generation_pb2 as pb
from fastserve.v1 import generation_pb2_grpc
from services.common.sampling import SamplingParams
from services.frontend.generation import Delta, GenerationCore
from services.frontend.main import Frontend, add_arguments
from services.frontend.tokenizer import ModelTokenizer
from services.frontend.validation import SamplingRequest

EOS = 2  # <|im_end|>: a special token, decoded to no text


def ids_of(model: ModelTokenizer, *pieces: str) -> list[int]:
    """One token id per piece (each piece must be a single token)."""
    ids = []
    for piece in pieces:
        (token,) = model.tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids.append(token)
    return ids


def split_e_acute(model: ModelTokenizer) -> list[int]:
    """'é' (two UTF-8 bytes) as two byte-level tokens, one byte each."""
    ids = model.tokenizer.convert_tokens_to_ids(["Ã", "©"])
    assert model.tokenizer.decode(ids) == "é"
    return ids


def logprob(k: int) -> float:
    return -0.125 * (k + 1)  # exact in float32


def token_events(job_id: str, ids: Sequence[int], first: int = 0, *, finish: bool = False):
    """One JobEvent carrying `ids` (the k-th generated token has logprob(k))."""
    return spb.JobEvent(
        job_id=job_id,
        kind=spb.EVENT_KIND_FINISHED if finish else spb.EVENT_KIND_TOKENS,
        token_ids=ids,
        finish_reason=spb.FINISH_REASON_LENGTH if finish else spb.FINISH_REASON_UNSPECIFIED,
        logprobs=[
            cpb.TokenLogprobs(
                logprob=logprob(first + k), top=[cpb.TopLogprob(token_id=t, logprob=logprob(k))]
            )
            for k, t in enumerate(ids)
        ],
    )


def one_token_per_iteration(job_id: str, ids: Sequence[int]) -> list[list[spb.JobEvent]]:
    """What the scheduler sends: a QUEUED event, then one token per iteration, the last one
    FINISHED (length)."""
    batches = [[spb.JobEvent(job_id=job_id, kind=spb.EVENT_KIND_QUEUED)]]
    for k, token in enumerate(ids):
        batches.append([token_events(job_id, [token], k, finish=k == len(ids) - 1)])
    return batches


# -- the generation core, on a scripted link ---------------------------------------------------


class ScriptedLink:
    """Stands in for SchedulerLink: every batch of the script is already queued when the
    request's task first waits (the consumer woke late, with many iterations waiting)."""

    def __init__(self, script) -> None:
        self.script = script  # job_id -> list of batches
        self.cancelled: list[str] = []
        self.forgotten: list[str] = []

    def submit(self, submit: spb.Submit) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        for batch in self.script(submit.job_id):
            queue.put_nowait(batch)
        return queue

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def forget(self, job_id: str) -> None:
        self.forgotten.append(job_id)


def sampling(stop: Sequence[str] = (), logprobs: bool = True) -> SamplingRequest:
    params = SamplingParams(logprobs=logprobs, top_logprobs=1 if logprobs else 0)
    return SamplingRequest(max_tokens=64, stop=tuple(stop), ignore_eos=True, params=params)


def run_core(model, script, stop: Sequence[str] = ()) -> tuple[list[Delta], ScriptedLink]:
    link = ScriptedLink(script)
    core = GenerationCore(model, link, default_max_tokens=64)  # type: ignore[arg-type]

    async def collect() -> list[Delta]:
        request = core.prepare(model.encode_prompt("Say:"), sampling(stop))
        return [delta async for delta in core.generate(request)]

    deltas = asyncio.run(collect())
    return [d for d in deltas if d.state is None], link


def check_logprobs(deltas: list[Delta]) -> None:
    """One logprob per token, in each delta, in generation order."""
    k = 0
    for delta in deltas:
        assert [lp.token_id for lp in delta.logprobs] == delta.token_ids
        for lp in delta.logprobs:
            assert lp.logprob == logprob(k)
            k += 1


def test_one_delta_per_token_though_every_iteration_was_waiting(model):
    ids = ids_of(model, "Hello", " world", "!", " ok")
    deltas, link = run_core(model, lambda job: one_token_per_iteration(job, ids))
    assert [d.token_ids for d in deltas] == [[t] for t in ids]
    assert [d.text for d in deltas] == ["Hello", " world", "!", " ok"]
    assert [d.finish_reason for d in deltas] == [None, None, None, "length"]
    assert deltas[-1].num_completion_tokens == len(ids)
    check_logprobs(deltas)
    assert link.forgotten and not link.cancelled


def test_several_tokens_in_one_event_or_one_batch_still_get_a_delta_each(model):
    ids = ids_of(model, "Hello", " world", "!", " ok", " more")

    def script(job):
        return [
            [token_events(job, ids[:3])],  # one event with three tokens
            [token_events(job, ids[3:4], 3), token_events(job, ids[4:], 4, finish=True)],
        ]

    deltas, _ = run_core(model, script)
    assert [d.token_ids for d in deltas] == [[t] for t in ids]
    assert "".join(d.text for d in deltas) == "Hello world! ok more"
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].num_completion_tokens == 5
    check_logprobs(deltas)


def test_a_special_token_gets_its_own_empty_delta(model):
    ids = [*ids_of(model, "Hello"), EOS, *ids_of(model, " ok")]  # ignore_eos: EOS mid-stream
    deltas, _ = run_core(model, lambda job: one_token_per_iteration(job, ids))
    assert [(d.token_ids, d.text) for d in deltas] == [
        ([ids[0]], "Hello"),
        ([EOS], ""),
        ([ids[2]], " ok"),
    ]


def test_a_character_split_over_tokens_is_held_back_one_fewer_delta(model):
    """'é' as two byte-level tokens: the first byte's token gets no delta; the next delta has
    both tokens, both logprobs and the whole character."""
    e_acute = split_e_acute(model)
    hello, ok = ids_of(model, "Hello", " ok")
    emoji = model.tokenizer(" 🎉", add_special_tokens=False)["input_ids"]  # three tokens
    ids = [hello, *e_acute, ok, *emoji, ok]
    deltas, _ = run_core(model, lambda job: one_token_per_iteration(job, ids))
    assert [(d.token_ids, d.text) for d in deltas] == [
        ([hello], "Hello"),
        (e_acute, "é"),
        ([ok], " ok"),
        (emoji, " 🎉"),
        ([ok], " ok"),
    ]
    assert len(deltas) == len(ids) - 1 - (len(emoji) - 1)
    assert deltas[-1].num_completion_tokens == len(ids)
    check_logprobs(deltas)


def test_an_incomplete_character_at_the_end_comes_out_with_the_last_token(model):
    hello = ids_of(model, "Hello")[0]
    first_byte = split_e_acute(model)[0]
    deltas, _ = run_core(model, lambda job: one_token_per_iteration(job, [hello, first_byte]))
    assert [(d.token_ids, d.text) for d in deltas] == [([hello], "Hello"), ([first_byte], "\ufffd")]
    assert deltas[-1].finish_reason == "length"


def test_a_possible_stop_string_prefix_is_held_back_until_it_resolves(model):
    """Stop "STOP": " S" shows its space and holds "S"; "T" shows nothing (held, no delta);
    "AY" releases "STAY" with both tokens; then " S", "TO" (held) and "P" completes the stop
    string: the last delta has "TO" and "P", no text, and finish reason stop."""
    pieces = ["Hello", " S", "T", "AY", " S", "TO", "P", " more", " never"]
    ids = ids_of(model, *pieces)
    deltas, link = run_core(model, lambda job: one_token_per_iteration(job, ids), stop=["STOP"])
    assert [(d.token_ids, d.text) for d in deltas] == [
        (ids[0:1], "Hello"),
        (ids[1:2], " "),
        (ids[2:4], "STAY"),
        (ids[4:5], " "),
        (ids[5:7], ""),
    ]
    assert deltas[-1].finish_reason == "stop"
    # Usage counts the tokens up to the one that completed the stop string.
    assert deltas[-1].num_completion_tokens == 7
    assert link.cancelled  # the scheduler stops generating
    check_logprobs(deltas)


def test_a_held_stop_prefix_that_never_completes_comes_out_at_the_end(model):
    ids = ids_of(model, "Hello", " S", "T")
    deltas, _ = run_core(model, lambda job: one_token_per_iteration(job, ids), stop=["STOP"])
    assert [(d.token_ids, d.text) for d in deltas] == [
        (ids[0:1], "Hello"),
        (ids[1:2], " "),
        (ids[2:3], "ST"),
    ]
    assert deltas[-1].finish_reason == "length"


# -- a real frontend against a scripted scheduler: SSE chunks and gRPC messages ---------------


class ScriptedScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Answers every Submit with `self.ids`, one token per iteration message, all at once (the
    frontend's request task finds them all waiting)."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    async def Connect(self, request_iterator, context):
        async for message in request_iterator:
            for submit in message.submits:
                for events in one_token_per_iteration(submit.job_id, self.ids):
                    yield spb.SchedulerMessage(events=events)


def frontend_args(scheduler_address: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--port", "0", "--http-port", "0", "--scheduler-address", scheduler_address]
    )


def run_frontend(model, ids: list[int], check):
    """A scripted scheduler and a real frontend; runs `await check(http, stub)`."""

    async def main():
        scheduler = ScriptedScheduler()
        scheduler.ids = ids
        server = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        frontend = await Frontend.start(frontend_args(f"127.0.0.1:{port}"), model)
        try:
            await asyncio.wait_for(frontend.link.connected.wait(), 30)
            async with (
                aiohttp.ClientSession(f"http://127.0.0.1:{frontend.http_port}") as http,
                grpc.aio.insecure_channel(f"127.0.0.1:{frontend.grpc_port}") as channel,
            ):
                return await check(http, generation_pb2_grpc.GenerationStub(channel))
        finally:
            await frontend.stop()
            await server.stop(None)

    return asyncio.run(main())


async def sse_events(http: aiohttp.ClientSession, path: str, body: dict) -> list[dict]:
    async with http.post(path, json={**body, "stream": True}) as response:
        assert response.status == 200, await response.text()
        raw = (await response.read()).decode()
    data = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_sse_and_grpc_give_one_chunk_per_token_except_held_back_ones(model):
    hello, ok = ids_of(model, "Hello", " ok")
    ids = [hello, *split_e_acute(model), EOS, ok]
    usage = {"stream_options": {"include_usage": True}, "max_tokens": 16}

    async def check(http, stub):
        # Completions: one chunk per token; the first byte of "é" rides with the second; the
        # special token gets a chunk with empty text. Then the usage chunk.
        events = await sse_events(http, "/v1/completions", {"prompt": "Say:", **usage})
        *chunks, last = events
        assert [c["choices"][0]["text"] for c in chunks] == ["Hello", "é", "", " ok"]
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(ids)

        # With logprobs: one entry per token, in the chunk that carries the token's text.
        events = await sse_events(http, "/v1/completions", {"prompt": "Say:", "logprobs": 1})
        entries = [c["choices"][0]["logprobs"]["token_logprobs"] for c in events]
        assert entries == [[logprob(0)], [logprob(1), logprob(2)], [logprob(3)], [logprob(4)]]

        # Chat: the opening chunk (role), then one chunk per token as above.
        chat = {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, **usage}
        *chunks, last = await sse_events(http, "/v1/chat/completions", chat)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        content = [c["choices"][0]["delta"].get("content") for c in chunks[1:]]
        assert content == ["Hello", "é", "", " ok"]
        per_chunk = [len(c["choices"][0]["logprobs"]["content"]) for c in chunks[1:]]
        assert per_chunk == [1, 2, 1, 1]
        assert last["usage"]["completion_tokens"] == len(ids)

        # gRPC: the same, with the token ids.
        request = pb.GenerateRequest(prompt="Say:", max_tokens=16, logprobs=True, top_logprobs=1)
        responses = [r async for r in stub.Generate(request)]
        tokens = [r for r in responses if r.state == pb.JOB_STATE_UNSPECIFIED]
        assert [(list(r.token_ids), r.text) for r in tokens] == [
            ([hello], "Hello"),
            (ids[1:3], "é"),
            ([EOS], ""),
            ([ok], " ok"),
        ]
        assert [len(r.logprobs) for r in tokens] == [1, 2, 1, 1]
        assert tokens[-1].usage.completion_tokens == len(ids)
        assert tokens[-1].finish_reason == pb.FINISH_REASON_LENGTH

    run_frontend(model, ids, check)
