from __future__ import annotations

import fcntl
import subprocess
from pathlib import Path

import pytest

from tests.deploy.chart import (
    ROOT,
    SCENARIOS,
    _render,
    make_var,
)


@pytest.fixture(scope="module")
def helm() -> Path:
    path = ROOT / make_var("HELM")
    path.parent.mkdir(parents=True, exist_ok=True)
    # One fetch at a time: test processes running in parallel would race on make's files.
    with open(path.parent / ".helm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            done = subprocess.run(
                ["make", "--no-print-directory", make_var("HELM")],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode != 0:
                pytest.fail(f"could not fetch helm:\n{done.stdout}\n{done.stderr}")
    return path


@pytest.fixture(params=sorted(SCENARIOS))
def scenario(request) -> str:
    return request.param


@pytest.fixture
def docs(helm, scenario) -> tuple[dict, ...]:
    return _render(helm, scenario)
