from __future__ import annotations

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
