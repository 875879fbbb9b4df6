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
import datetime
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.gpu_check_common import ROOT, wheels_to_carry
from bench.gpu_check_report import evaluate_targets, find, render_markdown, slug
from bench.gpu_check_run import Outcome, Step, run_steps

DEFAULT_OUT = ROOT / "docs" / "benchmarks"
DEFAULT_BUDGET_S = 470.0

# name, title, limit in seconds (GPU); CPU runs use the same limits.
GPU_STEPS: list[tuple[str, str, float]] = [
    ("env", "environment", 45),
    ("gpu-tests", 'GPU and Triton kernel tests (`pytest -m "gpu or triton"`)', 90),
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
            "wheels_to_carry": wheels_to_carry(),
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
