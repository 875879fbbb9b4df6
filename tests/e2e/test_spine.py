"""The spine end to end: `fastserve up` with four real processes and a tiny random Llama."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from fastserve.v1 import generation_pb2 as pb
from fastserve_client import Client, InvalidArgumentError
from services.common.health import is_serving
from services.frontend.tokenizer import encode_prompt
from testing.oracle import assert_greedy_matches, hf_greedy
from testing.stack import Stack, pid_alive
from testing.tiny_model import tiny_llama_variant
from tests.e2e.test_swapping import PRESSURE, check_exact, run_all
from tests.e2e.test_swapping import PROMPTS as SWAP_PROMPTS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Le renard brun rapide saute par-dessus le chien paresseux. 日本語のテキスト",
    "a " * 60,
    "What is the meaning of life?",
]


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    # A small block pool (64 blocks x 16 tokens) so 16 concurrent jobs also exercise preemption.
    stack = Stack.start(tiny_model_dir, "--num-blocks", "64", "--max-batch-size", "8")
    yield stack
    assert stack.stop() == 0, "".join(stack.output[-40:])


def test_sixteen_concurrent_greedy_requests_match_transformers(
    stack, tiny_hf_model, tiny_tokenizer
):
    requests = [
        (PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 12 + 3 * i) for i in range(16)
    ]

    def run(item):
        prompt, max_tokens = item
        with Client(stack.address) as client:
            return client.complete(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, requests))
    for (prompt, max_tokens), result in zip(requests, results, strict=True):
        prompt_ids = encode_prompt(tiny_tokenizer, prompt)
        assert result.usage.prompt_tokens == len(prompt_ids)
        assert result.usage.completion_tokens == max_tokens == len(result.token_ids)
        assert result.finish_reason == "length"
        ref = hf_greedy(tiny_hf_model, prompt_ids, max_tokens)
        assert_greedy_matches(tiny_hf_model, prompt_ids, result.token_ids, ref)
        assert result.text == tiny_tokenizer.decode(result.token_ids, skip_special_tokens=True)
    stats = stack.wait_until_idle()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["worker_kv_blocks_used"] == 0


def test_stop_string_ends_generation_and_is_not_shown(stack):
    with Client(stack.address) as client:
        full = client.complete("Once upon a time", max_tokens=20, temperature=0, ignore_eos=True)
        stop = full.text[5:9]
        assert stop.strip(), full.text
        cut = client.complete(
            "Once upon a time", max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]
        )
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_seeded_sampling_is_reproducible(stack):
    with Client(stack.address) as client:
        runs = [
            client.complete("Hello", max_tokens=10, temperature=1.0, top_p=0.9, seed=7).token_ids
            for _ in range(2)
        ]
        other = client.complete("Hello", max_tokens=10, temperature=1.0, seed=8).token_ids
    assert runs[0] == runs[1]
    assert other != runs[0]


def test_chat_uses_the_chat_template(stack, tiny_tokenizer):
    from services.frontend.tokenizer import ChatTurn, encode_chat

    messages = [{"role": "user", "content": "What is 2+2?"}]
    with Client(stack.address) as client:
        result = client.complete(messages=messages, max_tokens=4, temperature=0, ignore_eos=True)
    expected_ids = encode_chat(tiny_tokenizer, [ChatTurn("user", "What is 2+2?")])
    assert result.usage.prompt_tokens == len(expected_ids)


def test_dropping_a_stream_cancels_the_job_and_frees_its_blocks(stack):
    before = stack.scheduler_stats()
    with Client(stack.address) as client:
        stream = client.generate("Tell me a long story", max_tokens=400, ignore_eos=True)
        received = 0
        for chunk in stream:
            received += len(chunk.token_ids)
            if received >= 5:
                break
        # Stats are a snapshot refreshed at most every 50 ms while the engine is busy.
        busy = stack.wait_for_stats(lambda s: s["kv_blocks_free"] < s["kv_blocks_total"], 5.0)
        stream.close()
    assert busy["kv_blocks_free"] < busy["kv_blocks_total"]  # the job held blocks mid-stream
    stats = stack.wait_until_idle(lambda s: s["cancelled_jobs"] > before["cancelled_jobs"])
    assert stats["cancelled_jobs"] == before["cancelled_jobs"] + 1
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["worker_kv_blocks_used"] == 0
    assert stats["waiting_jobs"] == stats["running_jobs"] == 0


BAD_REQUESTS = [
    ("prompt", dict(prompt="", max_tokens=4)),
    ("max_tokens", dict(prompt="hi", max_tokens=0)),
    ("max_tokens", dict(prompt="hi", max_tokens=-3)),
    ("max_tokens", dict(prompt="hi", max_tokens=100_000)),
    ("temperature", dict(prompt="hi", temperature=-0.5)),
    ("top_p", dict(prompt="hi", top_p=0.0)),
    ("top_p", dict(prompt="hi", top_p=1.5)),
    ("top_k", dict(prompt="hi", top_k=-1)),
    ("model", dict(prompt="hi", model="no-such-model")),
    ("chat.messages", dict(chat=pb.ChatInput())),
]


def _raw_generate(address: str, payload: bytes):
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream(
            "/fastserve.v1.Generation/Generate",
            request_serializer=lambda b: b,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        return list(call(payload, timeout=30))


def test_bad_input_is_invalid_argument_naming_the_field(stack):
    with grpc.insecure_channel(stack.address) as channel:
        stub = pb_grpc_stub(channel)
        for field, kwargs in BAD_REQUESTS:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(pb.GenerateRequest(**kwargs), timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, info.value)
            assert info.value.details().startswith(field), (field, info.value.details())
    # Invalid UTF-8 in the prompt (field 2) and in a chat message's content.
    bad_prompt = b"\x12\x03a\xff\xfe"
    content = b"\x12\x02\xc3\x28"  # ChatMessage.content with a broken 2-byte sequence
    message = b"\x0a\x04user" + content
    chat = b"\x0a" + bytes([len(message)]) + message
    bad_chat = b"\x1a" + bytes([len(chat)]) + chat
    for payload, field in [(bad_prompt, "prompt"), (bad_chat, "chat.messages[0].content")]:
        with pytest.raises(grpc.RpcError) as info:
            _raw_generate(stack.address, payload)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field), info.value.details()
    # The SDK raises its typed error with the same message.
    with Client(stack.address) as client, pytest.raises(InvalidArgumentError, match="top_k"):
        client.complete("hi", top_k=-1)
    # Every process is alive and serving, and normal requests still work.
    assert all(pid_alive(pid) for pid in stack.child_pids())
    assert is_serving(stack.address) and is_serving(stack.scheduler_address)
    with Client(stack.address) as client:
        assert client.complete("hi", max_tokens=3, temperature=0).usage.completion_tokens >= 1


def pb_grpc_stub(channel):
    from fastserve.v1 import generation_pb2_grpc

    return generation_pb2_grpc.GenerationStub(channel)


def test_list_models(stack, tiny_model_dir):
    with Client(stack.address) as client:
        (model,) = client.list_models()
    assert model.name == tiny_model_dir.name
    assert model.max_context_tokens == 512


def test_generate_command_streams_text(stack):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "generate", "Hello", "--max-tokens", "5",
         "--raw", "--address", stack.address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_sigterm_leaves_no_process_behind(tiny_model_dir):
    stack = Stack.start(tiny_model_dir, "--num-blocks", "32")
    children = stack.child_pids()
    assert len(children) == 4
    assert stack.stop() == 0
    time.sleep(0.5)
    assert not [pid for pid in children if pid_alive(pid)]


def test_a_crashed_child_stops_the_stack_and_is_named(tiny_model_dir):
    # The scheduler holds every job's state, so it is the one child not restarted (workers
    # and the kvstore hold caches and are; see test_pipeline.py and test_swapping.py).
    stack = Stack.start(tiny_model_dir, "--num-blocks", "32")
    children = stack.child_pids()
    scheduler = next(
        pid
        for pid in children
        if "scheduler" in Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    )
    os.kill(scheduler, signal.SIGKILL)
    code = stack.process.wait(timeout=30)
    assert code != 0
    assert any("scheduler exited" in line for line in stack.output), "".join(stack.output[-20:])
    time.sleep(0.5)
    assert not [pid for pid in children if pid_alive(pid)]


EOS_PROMPT = "Once upon a time"
EOS_AT = 4  # the spare stack's EOS is the first new token greedy decoding emits here or later


@pytest.fixture(scope="module")
def eos_reference(tiny_hf_model, tiny_tokenizer):
    """HF's greedy tokens for EOS_PROMPT, and the index of the one the spare stack calls EOS."""
    ref = hf_greedy(tiny_hf_model, encode_prompt(tiny_tokenizer, EOS_PROMPT), 12)
    return ref, next(i for i in range(EOS_AT, len(ref)) if ref[i] not in ref[:i])


@pytest.fixture(scope="module")
def spare_stack(eos_reference, tmp_path_factory):
    """A stack of its own for tests that change it: its worker gets killed, and it serves the
    tiny weights under a config whose EOS is a token greedy decoding emits (random weights
    practically never pick the tokenizer's real EOS). Few blocks keep jobs in flight longer."""
    ref, index = eos_reference
    folder = tmp_path_factory.mktemp("eos") / "tiny-llama-eos"
    stack = Stack.start(tiny_llama_variant(folder, eos_token_id=ref[index]), *PRESSURE)
    yield stack
    assert stack.stop() == 0, "".join(stack.output[-40:])


def test_greedy_stops_at_eos_unless_ignore_eos(spare_stack, eos_reference):
    ref, index = eos_reference
    with Client(spare_stack.address) as client:
        stopped = client.complete(EOS_PROMPT, max_tokens=len(ref), temperature=0)
        ignored = client.complete(EOS_PROMPT, max_tokens=len(ref), temperature=0, ignore_eos=True)
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == ref[: index + 1]  # the EOS token is the last one sent
    assert stopped.usage.completion_tokens == index + 1
    assert ignored.finish_reason == "length" and ignored.token_ids == ref


def test_a_killed_worker_is_restarted_and_every_request_completes(
    spare_stack, tiny_hf_model, tiny_tokenizer
):
    def worker_pid() -> int:
        for pid in spare_stack.child_pids():
            if "worker" in Path(f"/proc/{pid}/cmdline").read_text().split("\0"):
                return pid
        raise AssertionError(f"no worker among {spare_stack.child_pids()}")

    victim = worker_pid()
    before = spare_stack.scheduler_stats()
    killed = []

    def kill_mid_run():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            spare_stack.scheduler_stats()["finished_jobs"] < before["finished_jobs"] + 2
        ):
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        killed.append(spare_stack.scheduler_stats()["finished_jobs"] - before["finished_jobs"])

    outputs = run_all(spare_stack, pause=kill_mid_run)
    stats = spare_stack.wait_until_idle()
    assert killed and killed[0] < len(SWAP_PROMPTS), "the worker must die while requests run"
    assert not pid_alive(victim) and worker_pid() != victim
    assert any("worker exited" in line and "restart" in line for line in spare_stack.output)
    check_exact(outputs, tiny_hf_model, tiny_tokenizer)
    assert stats["recomputed_jobs"] > before["recomputed_jobs"]  # lost KV re-prefilled


def test_every_service_serves_health_and_reflection(stack):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    expected = {
        "frontend": "fastserve.v1.Generation",
        "scheduler": "fastserve.scheduler.v1.Scheduler",
        "worker": "fastserve.worker.v1.Worker",
        "kvstore": "fastserve.kvstore.v1.KVStore",
    }
    assert set(stack.addresses) == set(expected)
    for name, address in stack.addresses.items():
        assert is_serving(address), name
        with grpc.insecure_channel(address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        services = {s.name for s in reply.list_services_response.service}
        assert expected[name] in services and "grpc.health.v1.Health" in services, name


def test_scheduler_rejects_a_malformed_submit_and_keeps_serving(stack):
    from fastserve.common.v1 import sampling_pb2 as cpb
    from fastserve.scheduler.v1 import scheduler_pb2 as spb
    from fastserve.scheduler.v1 import scheduler_pb2_grpc

    bad = spb.Submit(job_id="bad", prompt_token_ids=[], max_tokens=4)
    good = spb.Submit(
        job_id="good", prompt_token_ids=[1, 2, 3], max_tokens=2, sampling=cpb.SamplingParams()
    )
    done = threading.Event()

    def requests():
        yield spb.FrontendMessage(submits=[bad, good])
        done.wait(30)  # ending the stream would cancel this "frontend's" jobs

    with grpc.insecure_channel(stack.scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        call = stub.Connect(requests(), timeout=30)
        events = {}
        for message in call:
            for event in message.events:
                events.setdefault(event.job_id, []).append(event)
            if any(e.kind == spb.EVENT_KIND_FINISHED for e in events.get("good", [])):
                done.set()
                call.cancel()
                break
    (rejected,) = events["bad"]
    assert rejected.kind == spb.EVENT_KIND_REJECTED
    assert rejected.error.startswith("prompt_token_ids")
    finished = events["good"][-1]
    assert finished.finish_reason == spb.FINISH_REASON_LENGTH


def test_worker_refuses_a_bad_command_by_field_and_keeps_its_stream(stack):
    from fastserve.worker.v1 import worker_pb2 as wpb
    from fastserve.worker.v1 import worker_pb2_grpc

    info_blocks = None
    with grpc.insecure_channel(stack.addresses["worker"]) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        info_blocks = stub.Info(wpb.InfoRequest(), timeout=5).num_blocks
        # A second stream beside the scheduler's: job ids that the scheduler never uses.
        commands = [
            wpb.Command(
                command_id=1,
                step=wpb.Step(
                    seqs=[wpb.SeqInput(job_id="x", token_ids=[5], block_ids=[info_blocks + 7])]
                ),
            ),
            wpb.Command(
                command_id=2,
                step=wpb.Step(
                    seqs=[wpb.SeqInput(job_id="x", token_ids=[5, 6], block_ids=[], sample=True)]
                ),
            ),
            wpb.Command(command_id=3, free=wpb.Free(job_ids=["x"])),
        ]
        results = list(stub.Run(iter(commands), timeout=30))
    assert [r.command_id for r in results] == [1, 2, 3]
    assert "block_ids" in results[0].error and "out of range" in results[0].error
    assert "block_ids" in results[1].error
    assert results[2].error == ""
    assert is_serving(stack.addresses["worker"])
