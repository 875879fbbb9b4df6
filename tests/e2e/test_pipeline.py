"""Pipeline-parallel stages end to end: S worker processes passing activations by gloo,
several batches in flight, exact greedy output (a stage killed mid-run: test_pipeline_restart)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testing.stack import Stack
from tests.e2e.test_swapping import check_exact, run_all

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Few blocks and a small batch: jobs of mixed lengths are preempted (skip-join MLFQ) and
# swapped (swap cost 0: always swap rather than recompute) while S batches are in flight;
# each stage swaps its own shard and the scheduler joins the stages' completions.
PRESSURE = ("--kv-blocks", "16", "--max-batch-size", "3", "--reserve-blocks", "2",
            "--swap-cost-scale", "0", "--host-cache-blocks", "0")  # fmt: skip


def stage_pid(stack: Stack, index: int) -> int:
    for pid in stack.child_pids():
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        if "worker" in argv and argv[argv.index("--stage-index") + 1] == str(index):
            return pid
    raise AssertionError(f"no stage {index} among {stack.child_pids()}")


@pytest.fixture(scope="module")
def single_stage_outputs(tiny_model_dir):
    stack = Stack.start(tiny_model_dir, *PRESSURE)
    try:
        return run_all(stack)
    finally:
        stack.stop()


@pytest.mark.parametrize("stages", [2, 3])
def test_stages_give_the_reference_output(
    tiny_model_dir, tiny_hf_model, tiny_tokenizer, single_stage_outputs, stages
):
    stack = Stack.start(tiny_model_dir, *PRESSURE, "--stages", str(stages))
    try:
        outputs = run_all(stack)
        stats = stack.wait_until_idle()
    finally:
        assert stack.stop() == 0
    assert outputs == single_stage_outputs
    check_exact(outputs, tiny_hf_model, tiny_tokenizer)
    info = sorted(stats.samples("stage_info"), key=lambda sample: int(sample[0]["stage"]))
    assert [int(labels["stage"]) for labels, _ in info] == list(range(stages))
    num_layers = sum(int(labels["num_layers"]) for labels, _ in info)
    assert num_layers == tiny_hf_model.config.num_hidden_layers
    commands, busy = stats.per_stage("commands"), stats.per_stage("busy_seconds")
    assert all(c > 0 and b > 0 for c, b in zip(commands, busy, strict=True))
    wait = stats.per_stage("wait_seconds")
    assert wait[0] == 0 and wait[-1] > 0
    assert not any(stats.per_stage("kv_blocks_used"))
    assert stats["swapped_in_jobs"] > 0 and stats["swap_failures"] == 0, stats
    # Every shard came back (cached prefix blocks kept in the kvstore only go out: the host
    # tier is off here, see PRESSURE).
    assert stats["swap_in_bytes"] == stats["swap_out_bytes"] > 0
