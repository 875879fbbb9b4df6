"""A pipeline stage killed mid-run is restarted, and every request still completes with the
reference output (its own module, so the test runner can run it beside test_pipeline)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.e2e.test_pipeline import PRESSURE, stage_pid
from tests.e2e.test_swapping import PROMPTS, check_exact, run_all
from tests.stack import Stack, pid_alive

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("stage", [0, 1])
def test_killing_a_stage_mid_run_loses_no_request(
    tiny_model_dir, tiny_hf_model, tiny_tokenizer, stage
):
    """Stage 0 also serves the rendezvous store: its replacement serves it again."""
    stack = Stack.start(tiny_model_dir, *PRESSURE, "--stages", "2")
    victim = stage_pid(stack, stage)
    killed = []

    def kill_mid_run():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and stack.scheduler_stats().num_finished_jobs < 2:
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        killed.append(stack.scheduler_stats().num_finished_jobs)

    try:
        outputs = run_all(stack, pause=kill_mid_run)
        stats = stack.scheduler_stats()
        replacement = stage_pid(stack, stage)
    finally:
        assert stack.stop() == 0
    assert killed and killed[0] < len(PROMPTS), "the stage must die while requests run"
    assert not pid_alive(victim) and replacement != victim
    assert any(f"worker{stage} exited" in line and "restart" in line for line in stack.output)
    check_exact(outputs, tiny_hf_model, tiny_tokenizer)
    assert stats.num_recomputed_jobs > 0  # the jobs whose KV the stage lost re-prefilled
