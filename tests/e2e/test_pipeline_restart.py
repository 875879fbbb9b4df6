"""Pipeline stages killed mid-run are restarted, and every request still completes with the
reference output (its own module, so the test runner can run it beside test_pipeline)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from testing.stack import Stack, pid_alive
from tests.e2e.test_pipeline import PRESSURE, stage_pid
from tests.e2e.test_swapping import PROMPTS, check_exact, run_all

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_killing_each_stage_mid_run_loses_no_request(tiny_model_dir, tiny_hf_model, tiny_tokenizer):
    """Stage 0, which also serves the rendezvous store, is killed first; once its replacement
    has rejoined and another request has finished, stage 1. One run covers both, so the second
    kill also finds a pipeline that has been rebuilt once."""
    stack = Stack.start(tiny_model_dir, *PRESSURE, "--stages", "2")
    victims: list[int] = []
    finished_at_kill: list[int] = []

    def kill(stage: int, after_finished: int) -> None:
        deadline = time.monotonic() + 60
        while (
            time.monotonic() < deadline
            and stack.scheduler_stats()["finished_jobs"] < after_finished
        ):
            time.sleep(0.01)
        victim = stage_pid(stack, stage)
        os.kill(victim, signal.SIGKILL)
        victims.append(victim)
        finished_at_kill.append(stack.scheduler_stats()["finished_jobs"])

    def kill_each_stage() -> None:
        kill(0, 2)
        kill(1, finished_at_kill[0] + 1)

    try:
        outputs = run_all(stack, pause=kill_each_stage)
        stats = stack.scheduler_stats()
        replacements = [stage_pid(stack, 0), stage_pid(stack, 1)]
    finally:
        assert stack.stop() == 0
    assert all(n < len(PROMPTS) for n in finished_at_kill), "each stage must die mid-run"
    assert not any(pid_alive(pid) for pid in victims)
    assert not set(replacements) & set(victims)
    for stage in (0, 1):
        assert any(f"worker{stage} exited" in line and "restart" in line for line in stack.output)
    check_exact(outputs, tiny_hf_model, tiny_tokenizer)
    assert stats["recomputed_jobs"] > 0  # the jobs whose KV the stages lost re-prefilled
