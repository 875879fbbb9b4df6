"""bench/gpu_check.py: the one-command GPU check, in its CPU mode end to end (report and JSON
hold every step with a status and numbers), and its step runner (a step past its limit is
killed with everything it started, reported as timed out, and the rest still runs)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_check, gpu_check_report, gpu_check_run
from bench.gpu_check_run import Step, run_steps
from testing.stack import pid_alive

# Every CPU step but exactness (tests/e2e/test_swapping.py runs that workload already): ~25 s.
FAST_STEPS = ["env", "gpu-tests", "decode", "stack-tiny", "swap", "nccl"]


def python_step(name: str, code: str, limit_s: float) -> Step:
    return Step(name, name, limit_s, [sys.executable, "-c", code, "{result}"])


WRITE_OK = (
    "import json, sys; "
    "json.dump({'status': 'ok', 'summary': 'fine', 'value': 42}, open(sys.argv[1], 'w'))"
)


def test_a_step_past_its_limit_is_killed_with_its_children_and_the_rest_still_runs(tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen(['sleep', '120'], start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); "
        "time.sleep(120)"
    )
    steps = [
        python_step("hangs", hang, 2),
        python_step("crashes", "raise SystemExit(3)", 10),
        python_step("works", WRITE_OK, 10),
    ]
    seen: list[int] = []
    started = time.monotonic()
    outcomes = run_steps(steps, budget_s=60, on_outcome=lambda done: seen.append(len(done)))
    elapsed = time.monotonic() - started
    assert [o.status for o in outcomes] == ["timed out", "crashed", "ok"]
    hung = outcomes[0]
    assert hung.returncode is None and 2 <= hung.seconds < 2 + gpu_check_run.KILL_GRACE_S + 3
    assert "limit" in hung.summary
    # The grandchild ran in a session of its own, and it is gone too.
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child)
    assert outcomes[1].returncode == 3 and "wrote no result" in outcomes[1].summary
    assert outcomes[2].result["value"] == 42 and outcomes[2].summary == "fine"
    assert seen == [1, 2, 3]  # the report is rewritten after every step
    assert elapsed < 20


def test_steps_the_budget_cannot_fit_are_reported_not_run(monkeypatch):
    monkeypatch.setattr(gpu_check_run, "RESERVE_PER_STEP_S", 0.0)
    monkeypatch.setattr(gpu_check_run, "KILL_GRACE_S", 0.5)
    monkeypatch.setattr(gpu_check_run, "MIN_STEP_S", 1.0)
    steps = [
        python_step("slow", "import time; time.sleep(30)", 30),
        python_step("after", WRITE_OK, 5),
    ]
    outcomes = run_steps(steps, budget_s=3)
    assert outcomes[0].status == "timed out" and outcomes[0].limit_s < 3
    assert outcomes[1].status == "not run" and "budget" in outcomes[1].summary


def test_targets_are_judged_only_on_a_gpu_run():
    decode = gpu_check_run.Outcome(
        "decode", "", "ok", 1.0, 10, 0,
        {"rows": [
            {"shape": "8B", "batch": 1, "ours_over_bound": 1.4},
            {"shape": "8B", "batch": 16, "ours_over_bound": 1.6},
            {"shape": "1B", "batch": 16, "ours_over_bound": 2.0},
            {"shape": "1B", "batch": 64, "ours_over_bound": 2.5},
        ]},
    )  # fmt: skip
    stack = gpu_check_run.Outcome("stack-8b", "", "timed out", 100.0, 100, None)
    swap = gpu_check_run.Outcome("swap", "", "ok", 1.0, 10, 0, {"worst_ratio_at_4mib_or_more": 0.6})
    gpu = {
        t["target"]: t for t in gpu_check_report.evaluate_targets([decode, stack, swap], gpu=True)
    }
    statuses = [t["status"] for t in gpu.values()]
    assert statuses == [
        "not met",  # 8B: batch 16 at 1.6x
        "met",
        "unmeasured (step not run)",
        "unmeasured (step timed out)",
        "met",
        "unmeasured (step not run)",
    ]
    cpu = gpu_check_report.evaluate_targets([decode, stack, swap], gpu=False)
    assert {t["status"] for t in cpu} == {"unmeasured (CPU run)"}


@pytest.mark.e2e
@pytest.mark.slow
def test_the_cpu_mode_writes_a_report_and_json_with_every_step(tmp_path):
    code = gpu_check.main(
        ["--device", "cpu", "--quick", "--out", str(tmp_path), "--name", "check",
         "--steps", ",".join(FAST_STEPS)]
    )  # fmt: skip
    report = json.loads((tmp_path / "check.json").read_text())
    markdown = (tmp_path / "check.md").read_text()
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == FAST_STEPS
    failures = {n: (s["status"], s["output_tail"][-800:]) for n, s in steps.items()}
    assert code == 0, failures
    assert {s["status"] for n, s in steps.items() if n != "nccl"} == {"ok"}, failures
    assert steps["nccl"]["status"] == "skipped" and "CUDA" in steps["nccl"]["result"]["reason"]
    assert all(s["seconds"] > 0 and s["limit_s"] > 0 for s in steps.values())
    assert report["mode"] == "cpu" and report["device"] == "cpu"
    assert "not a GPU measurement" in markdown and "not a GPU measurement" in report["cpu_run_note"]

    env = steps["env"]["result"]
    assert env["torch"] and env["generated_code"] and env["wheels"]["grpcio"]
    tests = steps["gpu-tests"]["result"]
    assert tests["files"] and tests["failed"] == tests["errors"] == 0
    assert tests["passed"] + tests["skipped"] >= 1

    decode = steps["decode"]["result"]
    assert decode["copy_bandwidth_bytes_per_s"] > 1e8
    assert [(r["shape"], r["batch"]) for r in decode["rows"]] == [("tiny", 1), ("tiny", 4)]
    for row in decode["rows"]:
        assert row["ours_ms"] > 0 and row["hf_ms"] > 0 and row["bound_ms"] > 0
        assert row["ours_over_bound"] == pytest.approx(row["ours_ms"] / row["bound_ms"])
        assert row["kv_bytes"] == row["batch"] * 128 * 4 * 2 * 2 * 16 * 4  # tiny, float32
    assert decode["rows"][1]["kv_bytes"] == 4 * decode["rows"][0]["kv_bytes"]

    stack = steps["stack-tiny"]["result"]
    assert stack["errors"] == 0 and stack["output_tokens_total"] == 8 * 16
    assert stack["output_tokens_per_s"] > 0 and 0 < stack["ttft_p50_s"] < 30
    assert 0 < stack["mean_forward_seconds"] < stack["mean_iteration_seconds"]
    assert 0 < stack["control_plane_share"] < 1

    swap = steps["swap"]["result"]
    assert [round(r["mib"]) for r in swap["rows"]] == [1, 4]
    assert all(r["swap_out_gbps"] > 0 and r["copy_in_gbps"] > 0 for r in swap["rows"])

    headings = ["## Steps", "## One decode step", "## The whole stack", "## Swap bandwidth"]
    headings += ["## Targets of issue 15", "## Running it on an offline GPU machine"]
    assert all(heading in markdown for heading in headings)
    assert "grpcio-reflection 1.85.1" in markdown and "make proto" in markdown
    assert markdown.count("unmeasured (CPU run)") == len(report["targets"]) == 6


def test_two_pipeline_stages_check_runs_over_gloo_on_cpu():
    """The nccl step's body with the CPU's backend (no second GPU here)."""
    from bench.gpu_check_stages import run_two_stages

    result = run_two_stages(["cpu", "cpu"], "gloo")
    assert result["status"] == "ok", result
    assert result["jobs"] == 6 and result["iterations"] > 6 and not result["mismatches"]


def test_report_names_files_by_device_and_date():
    assert gpu_check_report.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check_report.slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
    assert Path(gpu_check.DEFAULT_OUT).parts[-2:] == ("docs", "benchmarks")
