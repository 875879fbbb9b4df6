"""The chart's metrics ports: the scheduler's and the workers' --metrics-port, their `metrics`
container ports, the PodMonitor that scrapes them and the NetworkPolicy rule that admits it."""

from __future__ import annotations

import json
import subprocess

import yaml

from tests.deploy.chart import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    container,
    flag,
    named_port,
    of_kind,
    pod_labels,
    selects,
    workload,
)
from tests.deploy.test_entrypoints import service_parser

SCRAPERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def render(helm, *sets: str) -> list[dict]:
    argv = [str(helm), "template", RELEASE, str(CHART), "-n", NAMESPACE]
    argv += ["--kube-version", KUBE_VERSION]
    for item in sets:
        argv += ["--set-json" if item.startswith("networkPolicy.metricsFrom=") else "--set", item]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def test_default_chart_serves_metrics_on_fixed_ports(helm):
    docs = render(helm)
    for component, port in (("scheduler", 9090), ("worker", 9091)):
        ctr = container(workload(docs, component))
        assert int(flag(ctr["args"], "--metrics-port")) == named_port(ctr, "metrics") == port
        assert service_parser(component).parse_args(["--metrics-port", str(port)]).metrics_port
    assert not of_kind(docs, "PodMonitor")  # serviceMonitor is off by default


def test_metrics_port_zero_turns_it_off(helm):
    docs = render(helm, "scheduler.metricsPort=0", "workers.metricsPort=0")
    for component in ("scheduler", "worker"):
        ctr = container(workload(docs, component))
        assert flag(ctr["args"], "--metrics-port") is None
        assert "metrics" not in {p["name"] for p in ctr["ports"]}


def test_pod_monitor_and_network_policy_reach_only_the_metrics_ports(helm):
    docs = render(
        helm,
        "serviceMonitor.enabled=true",
        "networkPolicy.metricsFrom=" + json.dumps(SCRAPERS),
    )
    (monitor,) = of_kind(docs, "PodMonitor")
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    selector = monitor["spec"]["selector"]
    (expression,) = selector["matchExpressions"]
    scraped = {
        pod_labels(w)["app.kubernetes.io/component"]
        for w in docs
        if w["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
        and selects(selector["matchLabels"], pod_labels(w))
        and pod_labels(w)["app.kubernetes.io/component"] in expression["values"]
    }
    assert scraped == {"scheduler", "worker"}
    outside = [
        rule
        for policy in of_kind(docs, "NetworkPolicy")
        for rule in policy["spec"]["ingress"]
        if rule.get("from") == SCRAPERS
    ]
    assert [rule["ports"] for rule in outside] == [[{"port": "metrics", "protocol": "TCP"}]]
