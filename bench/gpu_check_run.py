"""Running the steps of `bench.gpu_check`: each in its own process and session under its own
wall-clock limit, killed with everything it started when it runs past it, within one budget."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.gpu_check_common import ROOT
from testing.stack import descendants

KILL_GRACE_S = 5.0
RESERVE_PER_STEP_S = 15.0  # kept back for each later step, so one slow step cannot starve them
MIN_STEP_S = 10.0


@dataclass
class Step:
    name: str
    title: str
    limit_s: float
    argv: list[str]  # "{result}" in it is replaced by the path the step writes its JSON to


@dataclass
class Outcome:
    name: str
    title: str
    status: str  # ok, failed, skipped, timed out, crashed, not run
    seconds: float
    limit_s: float
    returncode: int | None
    result: dict[str, Any] = field(default_factory=dict)
    output_tail: str = ""

    @property
    def summary(self) -> str:
        text = str(self.result.get("summary") or "")
        reason = str(self.result.get("reason") or "")
        if self.status == "timed out":
            return f"ran past its {self.limit_s:.0f} s limit and was killed"
        if self.status in ("failed", "crashed", "not run", "skipped") and reason:
            return f"{reason}" + (f" ({text})" if text and text != reason else "")
        return text


def _signal(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the step's process group and everything it started (a stack's services run in
    their own groups), then SIGKILL whatever is left after KILL_GRACE_S."""
    tree = descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    _signal(tree, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(KILL_GRACE_S)
    tree = sorted(set(tree) | set(descendants(process.pid)))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    _signal(tree, signal.SIGKILL)
    process.wait()


def tail(path: Path, limit: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace")


def run_step(step: Step, limit_s: float, scratch: Path) -> Outcome:
    """Runs one step in its own session with a wall-clock limit; its output goes to a file (a
    pipe could be held open by a process the step left behind)."""
    result_path = scratch / f"{step.name}.json"
    log_path = scratch / f"{step.name}.log"
    argv = [arg.replace("{result}", str(result_path)) for arg in step.argv]
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | None = process.wait(limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            stop_tree(process)
            code, timed_out = None, True
        else:
            # Whatever the step left running (it should have stopped it) goes too.
            leftovers = descendants(process.pid)
            if leftovers:
                _signal(leftovers, signal.SIGKILL)
    seconds = time.monotonic() - started
    result: dict[str, Any] = {}
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
        except json.JSONDecodeError as error:
            result = {"status": "failed", "reason": f"unreadable result: {error}"}
    if timed_out:
        status = "timed out"
    elif not result:
        status = "crashed"
        result = {"reason": f"exited with code {code} and wrote no result"}
    else:
        status = str(result.get("status", "failed"))
    return Outcome(step.name, step.title, status, seconds, limit_s, code, result, tail(log_path))


def run_steps(
    steps: Sequence[Step],
    budget_s: float,
    on_outcome: Callable[[list[Outcome]], None] | None = None,
) -> list[Outcome]:
    """Each step under min(its limit, what the budget can spare while keeping
    RESERVE_PER_STEP_S for each later step); steps the budget cannot fit are `not run`."""
    deadline = time.monotonic() + budget_s
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for index, step in enumerate(steps):
            later = len(steps) - index - 1
            available = deadline - time.monotonic() - KILL_GRACE_S - RESERVE_PER_STEP_S * later
            limit = min(step.limit_s, available)
            if available < min(step.limit_s, MIN_STEP_S):
                outcome = Outcome(
                    step.name, step.title, "not run", 0.0, step.limit_s, None,
                    {"reason": f"the check's {budget_s:.0f} s budget was spent"},
                )  # fmt: skip
            else:
                print(f"[gpu-check] {step.name}: up to {limit:.0f} s ...", flush=True)
                outcome = run_step(step, limit, Path(scratch))
            print(
                f"[gpu-check] {step.name}: {outcome.status} in {outcome.seconds:.1f} s"
                f" - {outcome.summary}",
                flush=True,
            )
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcomes)
    return outcomes
