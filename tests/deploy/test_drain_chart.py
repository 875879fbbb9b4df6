"""Graceful shutdown in the chart: each pod's terminationGracePeriodSeconds covers its drain
(the frontend's preStop sleep and --drain-timeout; the scheduler's --drain-timeout; a worker's
--drain-timeout, which must outlast the scheduler's), rendered from values, and the chart
refuses values where it would not."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.deploy.chart import CHART, KUBE_VERSION, NAMESPACE, RELEASE, container, flag, workload


def _helm(helm, *sets: str) -> subprocess.CompletedProcess:
    argv = [str(helm), "template", RELEASE, str(CHART), "-n", NAMESPACE]
    argv += ["--kube-version", KUBE_VERSION]
    for item in sets:
        argv += ["--set", item]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def render(helm, *sets: str) -> list[dict]:
    done = _helm(helm, *sets)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render_error(helm, *sets: str) -> str:
    done = _helm(helm, *sets)
    assert done.returncode != 0, "the chart rendered"
    return done.stderr


def grace(docs, component: str) -> int:
    return workload(docs, component)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def args(docs, component: str) -> list[str]:
    return container(workload(docs, component))["args"]


def test_defaults_give_every_pod_a_grace_period_past_its_drain(helm):
    docs = render(helm)
    frontend = container(workload(docs, "frontend"))
    sleep = int(frontend["lifecycle"]["preStop"]["exec"]["command"][1])
    assert grace(docs, "frontend") > sleep + float(flag(frontend["args"], "--drain-timeout"))
    scheduler_drain = float(flag(args(docs, "scheduler"), "--drain-timeout"))
    worker_drain = float(flag(args(docs, "worker"), "--drain-timeout"))
    assert grace(docs, "scheduler") > scheduler_drain
    assert grace(docs, "worker") > worker_drain >= scheduler_drain


def test_values_set_the_drain_and_grace_of_each_pod(helm):
    docs = render(
        helm,
        "frontend.drainTimeoutSeconds=50", "frontend.preStopSleepSeconds=7",
        "frontend.terminationGracePeriodSeconds=70",
        "scheduler.drainTimeoutSeconds=100", "scheduler.terminationGracePeriodSeconds=120",
        "workers.drainTimeoutSeconds=110", "workers.terminationGracePeriodSeconds=130",
    )  # fmt: skip
    frontend = container(workload(docs, "frontend"))
    assert frontend["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    assert flag(frontend["args"], "--drain-timeout") == "50"
    assert grace(docs, "frontend") == 70
    assert flag(args(docs, "scheduler"), "--drain-timeout") == "100"
    assert grace(docs, "scheduler") == 120
    assert flag(args(docs, "worker"), "--drain-timeout") == "110"
    assert grace(docs, "worker") == 130


def test_no_prestop_hook_when_its_sleep_is_zero(helm):
    docs = render(helm, "frontend.preStopSleepSeconds=0")
    assert "lifecycle" not in container(workload(docs, "frontend"))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ("frontend.drainTimeoutSeconds=40", "frontend.terminationGracePeriodSeconds=45"),
            "frontend.terminationGracePeriodSeconds must exceed frontend.preStopSleepSeconds + "
            "frontend.drainTimeoutSeconds",
        ),
        (
            ("scheduler.terminationGracePeriodSeconds=30",),
            "scheduler.terminationGracePeriodSeconds must exceed scheduler.drainTimeoutSeconds",
        ),
        (
            ("workers.terminationGracePeriodSeconds=40",),
            "workers.terminationGracePeriodSeconds must exceed workers.drainTimeoutSeconds",
        ),
        (
            ("workers.drainTimeoutSeconds=20",),
            "workers.drainTimeoutSeconds must be at least scheduler.drainTimeoutSeconds",
        ),
    ],
)
def test_a_grace_period_that_does_not_cover_the_drain_is_refused(helm, sets, message):
    assert message in render_error(helm, *sets)
