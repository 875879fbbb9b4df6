"""The one-command GPU check of issue 15: runs each step in its own process under its own time
limit and writes a markdown report and a JSON file under docs/benchmarks/.

    make gpu-check                                   # or:
    .venv/bin/python -m bench.gpu_check [--device auto|cpu|cuda] [--quick] [--out DIR]
        [--name NAME] [--steps env,decode,...] [--budget-s 470]

Steps (bench/gpu_check_steps.py): env, gpu-tests (`pytest -m gpu`), decode (one decode step of
our engine vs transformers eager and the bound (weight + KV bytes) / copy bandwidth, 1B and 8B
shapes, batch 1/16/64, bf16, weights drawn on the GPU), stack-1b and stack-8b (`fastserve up
--load-format dummy`: output tokens/s, TTFT, per-token latency, the scheduler's iteration vs
forward time), exactness (the tiny model in float32 through preemption and swaps, against
transformers), swap (the worker's swaps vs plain pinned copies), nccl (two pipeline stages over
NCCL; skipped without two GPUs). On CPU (`--device cpu`, or auto without CUDA) the same steps
run at tiny sizes in float32 (stack-tiny instead of the shaped stacks), in about a minute.

A step that fails or runs past its limit (its process group and every process it started are
killed) is reported as such and the check goes on; the whole check stays within `--budget-s`
(default 470 s: under 8 minutes). The report is rewritten after every step, so a check cut
short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testing.stack import descendants

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks"
DEFAULT_BUDGET_S = 470.0
KILL_GRACE_S = 5.0
RESERVE_PER_STEP_S = 15.0  # kept back for each later step, so one slow step cannot starve them
MIN_STEP_S = 10.0
TODAY_STACK_TOKENS_PER_S = 1146.0  # the issue's H200 run, 1B shape, 64 x 128

# name, title, limit in seconds (GPU); CPU runs use the same limits.
GPU_STEPS: list[tuple[str, str, float]] = [
    ("env", "environment", 45),
    ("gpu-tests", "gpu-marked tests (`pytest -m gpu`)", 60),
    ("decode", "one decode step: ours, transformers eager, bound", 120),
    ("stack-1b", "whole stack, 1B shape, 64 concurrent x 128 tokens", 100),
    ("stack-8b", "whole stack, 8B shape, 16 concurrent x 128 tokens", 100),
    ("exactness", "float32 tiny model through preemption and swaps", 60),
    ("swap", "swap bandwidth vs plain pinned copies", 40),
    ("nccl", "two pipeline stages over NCCL", 45),
]
CPU_STEPS: list[tuple[str, str, float]] = [
    (name, title, limit) for name, title, limit in GPU_STEPS if name not in ("stack-1b", "stack-8b")
]
CPU_STEPS.insert(3, ("stack-tiny", "whole stack, tiny model, 8 concurrent x 16 tokens", 90))

WHEELS_NOTE = [
    "grpcio, grpcio-health-checking and grpcio-reflection 1.85.1",
    "protobuf 7.35.1 or newer",
    "redis",
    "prometheus_client",
]


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


# -- running steps


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


# -- the report


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def find(outcomes: Sequence[Outcome], name: str) -> Outcome | None:
    return next((o for o in outcomes if o.name == name), None)


Measure = Callable[[Outcome], tuple[str, bool] | None]


def evaluate_targets(outcomes: Sequence[Outcome], gpu: bool) -> list[dict[str, str]]:
    """The issue's targets: what this run measured for each, and whether it was met."""
    targets: list[dict[str, str]] = []

    def add(target: str, step: str, measure: Measure) -> None:
        outcome = find(outcomes, step)
        if not gpu:
            targets.append({"target": target, "measured": "-", "status": "unmeasured (CPU run)"})
            return
        if outcome is None or outcome.status not in ("ok", "failed"):
            why = "step not run" if outcome is None else f"step {outcome.status}"
            targets.append({"target": target, "measured": "-", "status": f"unmeasured ({why})"})
            return
        measured = measure(outcome)
        if measured is None:
            targets.append({"target": target, "measured": "-", "status": "unmeasured"})
            return
        text, met = measured
        targets.append({"target": target, "measured": text, "status": "met" if met else "not met"})

    def decode_ratio(shape: str, batches: tuple[int, ...], limit: float) -> Measure:
        def measure(outcome: Outcome) -> tuple[str, bool] | None:
            rows = {
                r["batch"]: r["ours_over_bound"]
                for r in outcome.result.get("rows", [])
                if r["shape"] == shape
            }
            if not all(b in rows for b in batches):
                return None
            text = ", ".join(f"batch {b}: {rows[b]:.1f}x" for b in batches)
            return text, all(rows[b] <= limit for b in batches)

        return measure

    def stack_value(key: str, fmt: str, ok: Callable[[float], bool]) -> Measure:
        def measure(outcome: Outcome) -> tuple[str, bool] | None:
            value = outcome.result.get(key)
            if value is None:
                return None
            return fmt.format(value), ok(float(value))

        return measure

    def swap_ratio(outcome: Outcome) -> tuple[str, bool] | None:
        worst = outcome.result.get("worst_ratio_at_4mib_or_more")
        if worst is None:
            return None
        return f"worst {100 * worst:.0f}% of the pinned copies", worst >= 0.5

    goal = 10 * TODAY_STACK_TOKENS_PER_S
    add("8B decode step <= 1.5x the bound at batch 1 and 16", "decode",
        decode_ratio("8B", (1, 16), 1.5))  # fmt: skip
    add("1B decode step <= 3x the bound at batch 16 and 64", "decode",
        decode_ratio("1B", (16, 64), 3.0))  # fmt: skip
    add(f"stack, 1B, 64 x 128 tokens: >= {goal:,.0f} output tokens/s", "stack-1b",
        stack_value("output_tokens_per_s", "{:,.0f} tokens/s", lambda v: v >= goal))  # fmt: skip
    add("control-plane share of an iteration <= 5% at 8B, batch 16", "stack-8b",
        stack_value("control_plane_share", "{:.1%}", lambda v: v <= 0.05))  # fmt: skip
    add("swaps of 4 MiB or more at >= 50% of the pinned copy bandwidth", "swap", swap_ratio)
    add("1B ready <= 15 s (here: `fastserve up` to ready, an upper bound)", "stack-1b",
        stack_value("ready_s", "{:.1f} s", lambda v: v <= 15))  # fmt: skip
    return targets


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    outcomes = [Outcome(**o) for o in report["steps"]]
    env = (find(outcomes, "env") or Outcome("env", "", "not run", 0, 0, None)).result
    gpu = report["mode"] == "cuda"
    lines = [f"# GPU check: {report['device']}, {report['date']}", ""]
    if not gpu:
        lines += [
            "**This is a CPU run of the harness, not a GPU measurement**: the same command at "
            "tiny sizes in float32 (`--device cpu`), to show that every step runs and reports. "
            "No GPU target of issue 15 is measured by it; the numbers below say nothing about "
            "a GPU.",
            "",
        ]
    lines += [
        f"- Command: `{report['command']}`; mode {report['mode']}"
        + (" (quick)" if report["quick"] else "")
        + f"; total {report['total_seconds']:.0f} s of a {report['budget_s']:.0f} s budget.",
        f"- Device: {report['device']}"
        + (f" ({env.get('device_memory_gib')} GiB)" if env.get("device_memory_gib") else "")
        + f"; {env.get('device_count', 0)} CUDA device(s); CPU {env.get('cpu', '-')} x "
        f"{env.get('cpu_count', '-')}.",
        f"- torch {env.get('torch', '-')}, CUDA {env.get('torch_cuda') or '-'}, transformers "
        f"{(env.get('wheels') or {}).get('transformers', '-')}, Python {env.get('python', '-')}; "
        f"commit {env.get('commit', '-')}" + (" (with local changes)" if env.get("dirty") else ""),
        "",
        "## Steps",
        "",
        "Each step ran as its own process under its own wall-clock limit.",
        "",
        "| step | status | seconds | limit s | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        summary = o.summary.replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {o.name}: {o.title} | {o.status} | {o.seconds:.1f} | {o.limit_s:.0f} | {summary} |"
        )
    decode = find(outcomes, "decode")
    if decode is not None and decode.result.get("rows"):
        r = decode.result
        lines += [
            "",
            "## One decode step",
            "",
            f"{r.get('dtype')}"
            + (f", {r['threads']} CPU thread" if r.get("threads") else "")
            + f", context {r['rows'][0]['context']}, vocabulary 8,192, random "
            f"weights drawn on the device; lowest of 3 medians of {r.get('repeats')} steps each, "
            f"after {r.get('warmup', 5)} warm-ups. "
            "Ours: the worker's ModelRunner on its paged pool; transformers: eager, its default "
            "attention, a DynamicCache of the same context; both sample greedily to the host. "
            f"Bound: (weight bytes + KV bytes read) / the measured copy bandwidth, "
            f"{r['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (bytes read + written by one "
            f"{r['copy_bytes'] >> 20} MiB copy).",
            "",
            "| shape, batch | ours ms | transformers ms | bound ms | ours / bound | "
            "ours / transformers |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['shape']}, batch {row['batch']} | {row['ours_ms']:.2f} | "
                f"{fmt(row.get('hf_ms'))} | {row['bound_ms']:.3f} | "
                f"{row['ours_over_bound']:.1f}x | {fmt(row.get('ours_over_hf'))}x |"
            )
    stacks = [o for o in outcomes if o.name.startswith("stack-") and "shape" in o.result]
    if stacks:
        lines += [
            "",
            "## The whole stack",
            "",
            "`fastserve up` (fcfs, --max-batch-size = the concurrency), all requests at once over "
            "streamed /v1/completions with token-id prompts, temperature 0, EOS ignored; one "
            "warm-up request first. Iteration and forward: the scheduler's Stats means over its "
            "last 1,000 iterations; control plane = (iteration - forward) / iteration.",
            "",
            "| run | ready s | output tokens/s | TTFT mean s | TTFT P50 s | per-token latency "
            "mean ms | TPOT mean ms | iteration ms | forward ms | control plane | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for o in stacks:
            s = o.result
            share = s.get("control_plane_share")
            per_token = s.get("per_token_latency_mean_s")
            tpot = s.get("tpot_mean_s")
            lines.append(
                f"| {s['shape']}, {s['concurrency']} x {s['output_tokens']} (prompt "
                f"{s['prompt_tokens']}) | {s['ready_s']:.1f} | {s['output_tokens_per_s']:.0f} | "
                f"{fmt(s.get('ttft_mean_s'), '.3f')} | {fmt(s.get('ttft_p50_s'), '.3f')} | "
                f"{fmt(None if per_token is None else 1e3 * per_token)} | "
                f"{fmt(None if tpot is None else 1e3 * tpot)} | "
                f"{1e3 * s['mean_iteration_seconds']:.2f} | "
                f"{1e3 * s['mean_forward_seconds']:.2f} | "
                f"{'-' if share is None else f'{share:.1%}'} | {s['errors']} |"
            )
    swap = find(outcomes, "swap")
    if swap is not None and swap.result.get("rows"):
        pinned = "pinned " if swap.result.get("pinned") else ""
        lines += [
            "",
            "## Swap bandwidth",
            "",
            f"The worker's Swapper through a kvstore process (shared memory, same host), timed "
            f"from the command to the reported completion, against plain {pinned}copies of the "
            f"same bytes between the pool and a host buffer allocated once; median of "
            f"{swap.result.get('rounds')} rounds after one warm-up.",
            "",
            "| MiB | swap out GB/s | swap in GB/s | copy out GB/s | copy in GB/s | out / copy | "
            "in / copy |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in swap.result["rows"]:
            lines.append(
                f"| {row['mib']:.1f} | {row['swap_out_gbps']:.2f} | {row['swap_in_gbps']:.2f} | "
                f"{row['copy_out_gbps']:.2f} | {row['copy_in_gbps']:.2f} | "
                f"{row['out_ratio']:.0%} | {row['in_ratio']:.0%} |"
            )
    lines += [
        "",
        "## Targets of issue 15",
        "",
        "| target | measured | status |",
        "| --- | --- | --- |",
    ]
    for target in report["targets"]:
        lines.append(f"| {target['target']} | {target['measured']} | {target['status']} |")
    wheels = env.get("wheels") or {}
    lines += [
        "",
        "## Running it on an offline GPU machine",
        "",
        "Run from a source tree with the generated gRPC code (`make proto` writes `gen/`), in a "
        "Python environment that has a CUDA build of torch, transformers, pytest, aiohttp and "
        "these wheels, which must be carried there (the machine has no network):",
        "",
        *[f"- {wheel}" for wheel in WHEELS_NOTE],
        "",
        "Found here: "
        + ", ".join(f"{name} {version or 'MISSING'}" for name, version in wheels.items())
        + ("; generated code present." if env.get("generated_code") else "; NO generated code."),
        "",
        "Then `make gpu-check` (or `.venv/bin/python -m bench.gpu_check`): at most "
        f"{report['budget_s']:.0f} s, each step under its own limit.",
    ]
    failed = [o for o in outcomes if o.status in ("failed", "timed out", "crashed")]
    for o in failed:
        lines += ["", f"### Output of {o.name} ({o.status})", "", "```", o.output_tail.strip()]
        lines += ["```"]
    return "\n".join(lines) + "\n"


def build_steps(names: Sequence[str], device: str, quick: bool) -> list[Step]:
    table = GPU_STEPS if device == "cuda" else CPU_STEPS
    known = {name: (title, limit) for name, title, limit in table}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown steps for --device {device}: {', '.join(unknown)}")
    steps = []
    for name in names:
        title, limit = known[name]
        argv = [sys.executable, "-m", "bench.gpu_check_steps", name, "--device", device]
        argv += ["--result", "{result}", *(["--quick"] if quick else [])]
        steps.append(Step(name, title, limit, argv))
    return steps


def cuda_available() -> bool:
    """Asked in a child process: this one should hold no CUDA context while the steps run."""
    probe = "import torch; print(torch.cuda.is_available())"
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return False
    return out.stdout.strip() == "True"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (CPU always is)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the report")
    parser.add_argument("--name", help="file name without suffix (default gpu-check-DEVICE-DATE)")
    parser.add_argument("--steps", help="comma-separated subset of the steps, in order")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    args = parser.parse_args(argv)
    started = time.monotonic()
    device = args.device
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    table = GPU_STEPS if device == "cuda" else CPU_STEPS
    names = args.steps.split(",") if args.steps else [name for name, _, _ in table]
    steps = build_steps(names, device, args.quick)
    date = datetime.date.today().isoformat()
    command = " ".join(["python -m bench.gpu_check", *(argv if argv is not None else sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def write(outcomes: list[Outcome]) -> None:
        env = (find(outcomes, "env") or Outcome("env", "", "not run", 0, 0, None)).result
        kind = env.get("device_name") or ("cpu" if device == "cpu" else "cuda")
        if not paths:
            name = args.name or f"gpu-check-{slug(kind)}-{date}"
            paths["md"], paths["json"] = args.out / f"{name}.md", args.out / f"{name}.json"
        report = {
            "date": date,
            "device": kind,
            "mode": device,
            "quick": args.quick,
            "command": command,
            "budget_s": args.budget_s,
            "total_seconds": time.monotonic() - started,
            "cpu_run_note": None
            if device == "cuda"
            else "a CPU run of the harness at tiny sizes, not a GPU measurement",
            "wheels_to_carry": WHEELS_NOTE,
            "steps": [asdict(o) for o in outcomes],
            "targets": evaluate_targets(outcomes, device == "cuda"),
        }
        paths["json"].write_text(json.dumps(report, indent=1, default=str) + "\n")
        paths["md"].write_text(render_markdown(report))

    outcomes = run_steps(steps, args.budget_s, on_outcome=write)
    if not outcomes:
        return 1
    print(f"[gpu-check] report: {paths['md']}\n[gpu-check] data: {paths['json']}")
    bad = [o.name for o in outcomes if o.status not in ("ok", "skipped")]
    if bad:
        print(f"[gpu-check] not ok: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
