"""Rendering the Helm chart and reading the manifests, for the deploy tests."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "k8s" / "fastserve"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
RELEASE, NAMESPACE = "fs", "serving"
SERVICES = ("frontend", "scheduler", "worker", "kvstore")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
POD_INDEX_FIELD = "metadata.labels['apps.kubernetes.io/pod-index']"


def make_var(name: str) -> str:
    """A `NAME := value` of the Makefile, so these tests and `make helm-lint` cannot drift."""
    match = re.search(rf"^{name}\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, f"Makefile has no {name}"
    return match.group(1).strip()


KUBE_VERSION = make_var("KUBE_VERSION")
VALUES_FILES = {p.stem: p for p in sorted((ROOT / "deploy/k8s/values").glob("*.yaml"))}
# Scenario -> (values file, --set flags). The four values files and the defaults are what
# `make helm-lint` renders; the others switch on what no values file does.
SCENARIOS: dict[str, tuple[Path | None, tuple[str, ...]]] = {
    "default": (None, ()),
    **{name: (path, ()) for name, path in VALUES_FILES.items()},
    "grpc-only": (
        None,
        ("frontend.http.enabled=false", "ingress.enabled=true", "apiKey.enabled=true"),
    ),
    "model-hostpath": (
        None,
        (
            "model.source=hostPath",
            "model.hostPath.path=/srv/models",
            "model.path=SmolLM2-135M-Instruct",
        ),
    ),
    # The volume's root is the model folder: --model is the mount path itself.
    "model-pvc": (
        None,
        ("model.source=pvc", "model.pvc.claimName=weights", "model.mountPath=/mnt/weights"),
    ),
    "redis-external-url": (
        VALUES_FILES["redis"],
        ("redis.mode=external", "redis.external.url=redis://:s3cret@redis.example:6380/2"),
    ),
    "everything": (
        VALUES_FILES["gpu-4-stages"],
        (
            "serviceMonitor.enabled=true",
            "ingress.enabled=true",
            "apiKey.enabled=true",
            "apiKey.mountAsFile=true",
            "redis.enabled=true",
            "redis.mode=external",
            "redis.external.existingSecret=redis-url",
            "kvstore.sharedMemory.hostPath=/dev/shm/fastserve",
            "workers.numStages=3",
            "workers.pipeline.layerSplit=12\\,10\\,10",  # Llama-3-8B: 32 layers
            "frontend.autoscaling.enabled=true",
            "scheduler.prefixCache=false",
            "scheduler.hostCacheBlocks=0",
            "frontend.priority.classes=3",
            "frontend.priority.default=1",
            "frontend.priority.top=1",
        ),
    ),
}


def helm_args(scenario: str) -> list[str]:
    values, sets = SCENARIOS[scenario]
    args = ["--kube-version", KUBE_VERSION]
    if values is not None:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    return args


@functools.cache
def _render(helm: Path, scenario: str) -> tuple[dict, ...]:
    done = subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "-n", NAMESPACE, *helm_args(scenario)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


# --- lookups in rendered manifests -------------------------------------------------------------


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def workload(docs, component: str) -> dict:
    found = [
        d
        for d in docs
        if d["kind"] in WORKLOAD_KINDS
        and pod_labels(d).get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{component}: {len(found)} workloads"
    return found[0]


def pod_labels(obj: dict) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"]["labels"]


def container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


def fastserve_containers(docs) -> dict[str, dict]:
    return {c: container(workload(docs, c)) for c in SERVICES}


def flag_pairs(args: list[str]) -> list[tuple[str, str]]:
    """The (flag, value) pairs after the subcommand; every FastServe flag here takes a value."""
    rest = args[1:]
    assert len(rest) % 2 == 0 and all(f.startswith("--") for f in rest[::2]), rest
    return list(zip(rest[::2], rest[1::2], strict=True))


def flag(args: list[str], name: str) -> str | None:
    values = [v for f, v in flag_pairs(args) if f == name]
    assert len(values) <= 1, f"{name} given twice"
    return values[0] if values else None


def named_port(ctr: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in ctr.get("ports", [])}
    assert name in ports, f"{ctr['name']} has no port {name!r}"
    return ports[name]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def service(docs, name: str) -> dict:
    found = [d for d in of_kind(docs, "Service") if d["metadata"]["name"] == name]
    assert found, f"no Service {name}"
    return found[0]


def service_target(docs, svc: dict, port: int) -> int:
    """The container port a Service port reaches (resolving named targetPorts)."""
    (entry,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    backends = [w for w in docs if w["kind"] in WORKLOAD_KINDS]
    (backend,) = [w for w in backends if selects(svc["spec"]["selector"], pod_labels(w))]
    target = entry.get("targetPort", port)
    return named_port(container(backend), target) if isinstance(target, str) else target


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def merged_values(scenario: str) -> dict:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    path, sets = SCENARIOS[scenario]
    overlays = [yaml.safe_load(path.read_text())] if path else []
    for item in sets:
        key, _, raw = item.partition("=")
        node: dict = {}
        top = node
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
        overlays.append(top)

    def merge(base: dict, over: dict) -> dict:
        for k, v in over.items():
            base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
        return base

    for overlay in overlays:
        values = merge(values, overlay)
    return values
