"""The steps of `bench.gpu_check`, each run as its own process under its own time limit:

    .venv/bin/python -m bench.gpu_check_steps STEP --device cpu|cuda [--quick] --result FILE

A step writes one JSON object to FILE: `status` (ok, failed or skipped), `reason` where it did
not pass, `summary` (one line for the report's table) and its numbers. It never decides what
the report says about the issue's targets: bench/gpu_check.py does.

Steps: env (versions, device), gpu-tests (`pytest -m "gpu or triton"`), decode (one decode
step of our engine vs transformers eager, and the bound), stack-1b / stack-8b / stack-tiny (the
whole stack's throughput and latency, and the scheduler's iteration vs forward time), exactness
(float32 tiny model through preemption and swaps, compared with transformers), swap (the
worker's swap path vs plain pinned copies), nccl (two pipeline stages over NCCL, two GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from bench.gpu_check_common import ROOT, WHEELS, Result
from bench.gpu_check_decode import step_decode
from bench.gpu_check_stack import step_exactness, step_stack
from bench.gpu_check_stages import step_nccl
from bench.gpu_check_swap import step_swap

# -- env


def step_env(args: argparse.Namespace) -> Result:
    from importlib import metadata

    import torch

    wheels = {}
    for name in [*WHEELS, "transformers", "pytest", "aiohttp"]:
        try:
            wheels[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            wheels[name] = None
    try:
        import fastserve.v1.generation_pb2  # noqa: F401

        generated = True
    except ImportError:
        generated = False
    info: Result = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "wheels": wheels,
        "generated_code": generated,
    }
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        info["dirty"] = bool(dirty)
    except OSError:
        info["commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device_name"] = props.name
        info["device_memory_gib"] = round(props.total_memory / (1 << 30), 1)
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    missing = [name for name in WHEELS if wheels.get(name) is None]
    status = "ok" if generated and not missing else "failed"
    reason = ""
    if not generated:
        reason += "no generated code (run `make proto`). "
    if missing:
        reason += f"missing wheels: {', '.join(missing)}"
    name = info.get("device_name") or "CPU"
    return {
        "status": status,
        "reason": reason.strip(),
        "summary": f"torch {torch.__version__}, CUDA {torch.version.cuda}, {name}",
        **info,
    }


# -- gpu-tests


GPU_MARKERS = ("gpu", "triton")  # CUDA-only tests, and the Triton kernels' (compiled there)


def gpu_test_files() -> list[str]:
    """Test files that use those markers (collecting only these keeps the step fast)."""
    return sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("test_*.py")
        if any(f"mark.{m}" in path.read_text(errors="replace") for m in GPU_MARKERS)
    )


def step_gpu_tests(args: argparse.Namespace) -> Result:
    files = gpu_test_files()
    if not files:
        return {"status": "failed", "reason": "no test file uses the gpu marker", "summary": ""}
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "junit.xml"
        argv = [sys.executable, "-m", "pytest", "-m", " or ".join(GPU_MARKERS), "-q"]
        argv += ["-p", "no:cacheprovider"]
        argv += [f"--junitxml={junit}", *files]
        completed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        print(completed.stdout[-4000:], completed.stderr[-2000:], sep="\n")
        if not junit.is_file():
            return {"status": "failed", "reason": f"pytest exited {completed.returncode}"}
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        skip_reasons = sorted(
            {
                node.get("message", "")
                for node in suite.iter("skipped")
                if node.get("message") is not None
            }
        )
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = completed.returncode == 0 and counts["failures"] == counts["errors"] == 0
    summary = (
        f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped"
    )
    return {
        "status": "ok" if ok else "failed",
        "reason": "" if ok else f"pytest exited {completed.returncode}",
        "summary": summary,
        "files": files,
        "passed": passed,
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "skip_reasons": skip_reasons,
        "returncode": completed.returncode,
    }


STEPS: dict[str, Callable[[argparse.Namespace], Result]] = {
    "env": step_env,
    "gpu-tests": step_gpu_tests,
    "decode": step_decode,
    "stack-1b": step_stack,
    "stack-8b": step_stack,
    "stack-tiny": step_stack,
    "exactness": step_exactness,
    "swap": step_swap,
    "nccl": step_nccl,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        result = STEPS[args.step](args)
    except Exception as error:
        import traceback

        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
    args.result.write_text(json.dumps(result, indent=1, default=str))
    return 0 if result.get("status") in ("ok", "skipped") else 1


if __name__ == "__main__":
    raise SystemExit(main())
