"""Stopping without losing admitted requests (issue 17), on real processes with the tiny model.

`fastserve up` on SIGTERM stops its frontend first and waits while it drains: streams in flight
(running, or admitted and queued at the scheduler) run to their end with exactly the tokens an
undisturbed run gives, new requests get 503 with Retry-After meanwhile, and only then do the
scheduler and workers stop; the launcher exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fastserve_client import Client
from fastserve_client.errors import UnavailableError
from testing.stack import Stack, pid_alive
from tests.e2e.test_openai import http_address

pytestmark = [pytest.mark.e2e]

NUM_STREAMS = 4
MAX_TOKENS = 300  # one at a time (--max-batch-size 1): the drain lasts seconds
PROMPTS = [f"Drain story {i}:" for i in range(NUM_STREAMS)]


def greedy_ids(stack: Stack, prompt: str) -> list[int]:
    with Client(stack.address) as client:
        stream = client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        return [token for chunk in stream for token in chunk.token_ids]


def completion(http: str, timeout_s: float = 10.0) -> tuple[int, dict[str, str], dict]:
    """A small /v1/completions: status, headers and body (an error's body too)."""
    request = urllib.request.Request(
        f"http://{http}/v1/completions",
        data=json.dumps({"prompt": "Hi", "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read() or b"{}")


class Streams:
    """PROMPTS streamed at once, each in a thread, greedy: `results` (prompt -> token ids),
    `errors`; `start` returns once every stream has been admitted."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.results: dict[str, list[int]] = {}
        self.errors: list[BaseException] = []
        self.finished = threading.Semaphore(0)  # released as each stream ends
        self._admitted = [threading.Event() for _ in PROMPTS]
        self.threads = [
            threading.Thread(target=self._stream, args=(i, p), daemon=True)
            for i, p in enumerate(PROMPTS)
        ]

    def _stream(self, index: int, prompt: str) -> None:
        try:
            with Client(self.stack.address) as client:
                ids = []
                stream = client.generate(
                    prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True
                )
                for chunk in stream:
                    self._admitted[index].set()  # queued at the scheduler, or running
                    ids += chunk.token_ids
                self.results[prompt] = ids
        except BaseException as exc:
            self.errors.append(exc)
            self._admitted[index].set()
        finally:
            self.finished.release()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        for event in self._admitted:
            assert event.wait(30)
        assert not self.errors, self.errors

    def any_running(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def join(self) -> dict[str, list[int]]:
        for thread in self.threads:
            thread.join(60)
        assert not self.errors, self.errors
        return self.results


def test_sigterm_to_fastserve_up_drains_the_frontend_before_stopping_the_rest(tiny_model_dir):
    stack = Stack.start(
        tiny_model_dir, "--max-batch-size", "1", "--drain-timeout", "25", "--http-port", "0"
    )
    try:
        http = http_address(stack)
        expected = {prompt: greedy_ids(stack, prompt) for prompt in PROMPTS}  # undisturbed
        assert all(len(ids) == MAX_TOKENS for ids in expected.values())

        streams = Streams(stack)
        streams.start()
        signaled_at = time.monotonic()
        stack.process.send_signal(signal.SIGTERM)

        # While it drains, a new request is refused with 503 and Retry-After.
        deadline = time.monotonic() + 10
        while True:
            status, headers, body = completion(http)
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 503, (status, body)
        assert int(headers["Retry-After"]) >= 1
        assert streams.any_running(), "the streams ended before the drain was seen"
        # Every admitted stream ran to its end, token for token.
        assert streams.join() == expected
        assert stack.process.wait(60) == 0, "".join(stack.output[-40:])
        assert time.monotonic() - signaled_at < 30
    finally:
        stack.stop()


def service_pid(stack: Stack, service: str) -> int:
    for pid in stack.child_pids():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if service.encode() in argv[3:4]:  # python -m services.cli <service> ...
            return pid
    raise AssertionError(f"no {service} process")


def test_sigterm_to_scheduler_and_worker_together_runs_the_admitted_jobs_to_their_end(
    tiny_model_dir,
):
    """As Kubernetes stops pods, independently and at once: the scheduler drains its jobs, the
    worker keeps serving while the scheduler is connected."""
    stack = Stack.start(tiny_model_dir, "--max-batch-size", "1", "--http-port", "0")
    try:
        expected = {prompt: greedy_ids(stack, prompt) for prompt in PROMPTS}
        scheduler, worker = service_pid(stack, "scheduler"), service_pid(stack, "worker")
        streams = Streams(stack)
        streams.start()
        os.kill(scheduler, signal.SIGTERM)
        os.kill(worker, signal.SIGTERM)
        time.sleep(0.5)  # the scheduler's signal handler has run
        with (  # a new request: refused, retryable
            Client(stack.address, max_retries=0) as client,
            pytest.raises(UnavailableError, match="shutting down") as refused,
        ):
            client.complete("Hi", max_tokens=2)
        assert refused.value.retry_after_s == 1
        assert streams.finished.acquire(timeout=30)
        # A job ended after the SIGTERMs and others are left: the worker is still the same one.
        assert streams.any_running(), "the streams ended before the drain was seen"
        assert pid_alive(worker) and service_pid(stack, "worker") == worker
        assert streams.join() == expected
        stack.process.wait(60)
        output = "".join(stack.output)
        assert "fastserve: scheduler exited with code 0; stopping the others" in output, output
    finally:
        stack.stop()
