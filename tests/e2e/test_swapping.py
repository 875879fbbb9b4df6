"""Proactive KV swapping end to end: exact output while jobs swap out and back in through the
kvstore (in memory, and Redis), and when the kvstore dies mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from services.frontend.tokenizer import encode_prompt
from testing.oracle import assert_greedy_matches, hf_greedy
from testing.redis_server import redis_server
from testing.stack import Stack, pid_alive
from testing.swap_workload import LENGTHS, PRESSURE, PROMPTS, run_all

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def check_exact(outputs, tiny_hf_model, tiny_tokenizer):
    for i, tokens in enumerate(outputs):
        prompt_ids = encode_prompt(tiny_tokenizer, PROMPTS[i])
        ref = hf_greedy(tiny_hf_model, prompt_ids, LENGTHS[i])
        assert_greedy_matches(tiny_hf_model, prompt_ids, tokens, ref)


@pytest.mark.parametrize("kv_policy", ["proactive", "reactive"])
def test_swapped_jobs_keep_exact_output_in_memory(
    tiny_model_dir, tiny_hf_model, tiny_tokenizer, kv_policy
):
    stack = Stack.start(tiny_model_dir, *PRESSURE, "--kv-policy", kv_policy)
    try:
        outputs = run_all(stack)
        stats = stack.wait_until_idle()
    finally:
        assert stack.stop() == 0
    check_exact(outputs, tiny_hf_model, tiny_tokenizer)
    assert stats.kv_policy == kv_policy
    assert stats["swapped_in_jobs"] >= len(PROMPTS) // 2, stats
    assert stats["swap_failures"] == 0 and stats["recomputed_jobs"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["host_jobs"] == 0


def test_swapped_jobs_keep_exact_output_through_redis(
    tiny_model_dir, tiny_hf_model, tiny_tokenizer
):
    with redis_server() as url:
        stack = Stack.start(tiny_model_dir, *PRESSURE, "--kvstore-backend", url)
        try:
            outputs = run_all(stack)
            stats = stack.scheduler_stats()
        finally:
            assert stack.stop() == 0
    check_exact(outputs, tiny_hf_model, tiny_tokenizer)
    assert stats["swapped_in_jobs"] >= len(PROMPTS) // 2 and stats["swap_failures"] == 0


def test_killing_the_kvstore_mid_run_loses_no_request(
    tiny_model_dir, tiny_hf_model, tiny_tokenizer
):
    stack = Stack.start(tiny_model_dir, *PRESSURE)
    kvstore_pid = next(
        pid
        for pid in stack.child_pids()
        if "kvstore" in Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    )
    killed = threading.Event()

    def kill_when_swapping():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if stack.scheduler_stats()["swapped_out_jobs"] >= 2:
                break
            time.sleep(0.01)
        os.kill(kvstore_pid, signal.SIGKILL)
        killed.set()

    def restarted():
        # The launcher polls its children every 0.2 s, so the requests can all finish before
        # it has noticed the death: wait for the new kvstore instead of reading too early.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            alive = [p for p in stack.child_pids() if pid_alive(p)]
            if len(alive) == 4 and any("kvstore is ready again" in line for line in stack.output):
                return alive
            time.sleep(0.05)
        return [p for p in stack.child_pids() if pid_alive(p)]

    try:
        outputs = run_all(stack, pause=kill_when_swapping)
        stats = stack.scheduler_stats()
        alive = restarted()
    finally:
        assert stack.stop() == 0
    assert killed.is_set() and not pid_alive(kvstore_pid)
    assert len(alive) == 4 and kvstore_pid not in alive  # the launcher started a new kvstore
    assert any("kvstore exited" in line and "restarting" in line for line in stack.output)
    check_exact(outputs, tiny_hf_model, tiny_tokenizer)
    assert stats["swapped_out_jobs"] >= 2
