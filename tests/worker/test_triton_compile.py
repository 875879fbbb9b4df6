"""Every Triton kernel variant the worker launches compiles for an H100/H200 (sm_90) here, with
no GPU: Triton's compiler down to a cubin (testing/triton_compile.py). The interpreter runs the
kernels' arithmetic in the other tests; only this sees what the compiler would refuse."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from testing.tiny_model import CACHE_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.triton]


def test_every_kernel_variant_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile now, not from an earlier run's cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    completed = subprocess.run(
        [sys.executable, "-m", "testing.triton_compile", "--arch", "90"],
        cwd=CACHE_ROOT.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = completed.stdout.splitlines()
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert len(lines) == 16 and all(line.startswith("ok ") for line in lines), lines
    assert all(int(line.split(": ")[1].split()[0]) > 0 for line in lines)  # cubin bytes
