"""Discovery: static addresses, and the Kubernetes path driven through the real `kubernetes`
client (REST calls, JSON deserialisation into V1Pod, `kubernetes.watch.Watch`) against a tiny
Kubernetes API on 127.0.0.1 that lists pods and streams watch events with chunked encoding."""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client

from services.scheduler.discovery import (
    POD_INDEX_LABEL,
    Endpoints,
    KubernetesDiscovery,
    StaticDiscovery,
    add_discovery_arguments,
    discovery_from_args,
)

NAMESPACE = "serving"
WORKERS = "app.kubernetes.io/name=fastserve,app.kubernetes.io/component=worker"
KVSTORES = "app.kubernetes.io/name=fastserve,app.kubernetes.io/component=kvstore"


def make_pod(
    name: str,
    ip: str | None,
    *,
    component: str = "worker",
    ready: bool = True,
    node: str = "node-a",
    labels: dict[str, str] | None = None,
    deleting: bool = False,
) -> dict:
    metadata = {
        "name": name,
        "namespace": NAMESPACE,
        "uid": str(uuid.uuid4()),
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "labels": {
            "app.kubernetes.io/name": "fastserve",
            "app.kubernetes.io/component": component,
            **(labels or {}),
        },
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:05:00Z"
    status: dict = {
        "phase": "Running" if ip else "Pending",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"nodeName": node, "containers": [{"name": component, "image": "fastserve"}]},
        "status": status,
    }


class FakeKubeApi:
    """Pods in one namespace: GET .../pods lists them (with a resourceVersion); with watch=true it
    streams the events after the given resourceVersion, then ends at timeoutSeconds. Events older
    than the last `compact()` get a 410 Expired ERROR event, as a real API server does."""

    def __init__(self) -> None:
        self.pods: dict[str, dict] = {}
        self.events: list[tuple[int, str, dict]] = []
        self.resource_version = 1000
        self.oldest_version = 0
        self.generation = 0  # bumped by end_watches(): open streams end
        self.lists: list[str] = []  # the label selector of each list call
        self.watch_versions: list[str] = []
        self.fail_next_lists = 0
        self.cond = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def core_api(self) -> client.CoreV1Api:
        return client.CoreV1Api(client.ApiClient(client.Configuration(host=self.url)))

    def apply(self, kind: str, pod: dict) -> None:
        with self.cond:
            self.resource_version += 1
            pod = json.loads(json.dumps(pod))
            pod["metadata"]["resourceVersion"] = str(self.resource_version)
            if kind == "DELETED":
                self.pods.pop(pod["metadata"]["name"], None)
            else:
                self.pods[pod["metadata"]["name"]] = pod
            self.events.append((self.resource_version, kind, pod))
            self.cond.notify_all()

    def compact(self) -> None:
        """Forgets the event history, so resuming an older watch gets 410 Gone."""
        with self.cond:
            self.oldest_version = self.resource_version + 1
            self.events.clear()

    def end_watches(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def _list(self, selector: str) -> tuple[int, dict]:
        with self.cond:
            self.lists.append(selector)
            if self.fail_next_lists:
                self.fail_next_lists -= 1
                status = {"kind": "Status", "code": 500, "reason": "InternalError"}
                return 500, status
            items = [p for p in self.pods.values() if _matches(p, selector)]
            meta = {"resourceVersion": str(self.resource_version)}
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": items}

    def _watch(self, selector: str, since: int, timeout_s: float) -> Iterator[dict]:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            generation = self.generation
            if since < self.oldest_version:
                yield {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": f"too old resource version: {since}",
                        "reason": "Expired",
                        "code": 410,
                    },
                }
                return
        while True:
            with self.cond:
                fresh = [(v, k, p) for v, k, p in self.events if v > since]
                if not fresh:
                    left = deadline - time.monotonic()
                    if left <= 0 or self.generation != generation:
                        return
                    self.cond.wait(left)
                    continue
            for version, kind, pod in fresh:
                since = version
                if _matches(pod, selector):
                    yield {"type": kind, "object": pod}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path != f"/api/v1/namespaces/{NAMESPACE}/pods":
                    self._send_json(404, {"kind": "Status", "code": 404})
                elif query.get("watch") == "true":
                    api.watch_versions.append(query.get("resourceVersion", ""))
                    self._stream(query)
                else:
                    self._send_json(*api._list(query.get("labelSelector", "")))

            def _send_json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, query: dict[str, str]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                events = api._watch(
                    query.get("labelSelector", ""),
                    int(query.get("resourceVersion") or 0),
                    float(query.get("timeoutSeconds") or 30),
                )
                try:
                    for event in events:
                        line = json.dumps(event).encode() + b"\n"
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:
                    self.close_connection = True  # the client went away (Watch.stop)

        return Handler

    def __enter__(self) -> FakeKubeApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end_watches()
        self.server.shutdown()
        self.server.server_close()


def _matches(pod: dict, selector: str) -> bool:
    labels = pod["metadata"].get("labels") or {}
    pairs = [term.split("=", 1) for term in selector.split(",") if term]
    return all(labels.get(key) == value for key, value in pairs)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def kube() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as api:
        yield api


def make_discovery(kube: FakeKubeApi, **overrides) -> KubernetesDiscovery:
    options = dict(watch_timeout_s=1, retry_delay_s=0.05)
    options.update(overrides)
    return KubernetesDiscovery(
        NAMESPACE, WORKERS, KVSTORES, 50061, 50071, api=kube.core_api(), **options
    )


def test_replaced_stage_pod_is_picked_up(kube):
    kube.apply("ADDED", make_pod("fs-worker-0", "10.0.0.10"))
    kube.apply("ADDED", make_pod("fs-worker-1", "10.0.0.11", node="node-b"))
    kube.apply("ADDED", make_pod("fs-worker-2", "10.0.0.12", ready=False))
    kube.apply("ADDED", make_pod("fs-kvstore-x7", "10.0.1.2", component="kvstore", node="node-b"))
    kube.apply("ADDED", make_pod("fs-kvstore-q4", "10.0.1.1", component="kvstore"))
    kube.apply("ADDED", make_pod("other-0", "10.0.9.9", component="frontend"))
    seen: list[Endpoints] = []
    discovery = make_discovery(kube, watch_timeout_s=30)
    discovery.subscribe(seen.append)
    discovery.start()
    try:
        discovery.wait_for_workers(2, timeout_s=5)
        wait_until(lambda: discovery.kvstore_address() is not None)
        # worker-2 is not Ready; the kvstore on stage 0's node wins.
        assert discovery.worker_addresses() == {0: "10.0.0.10:50061", 1: "10.0.0.11:50061"}
        assert discovery.kvstore_address() == "10.0.1.1:50071"

        kube.apply("MODIFIED", make_pod("fs-worker-2", "10.0.0.12"))
        wait_until(lambda: 2 in discovery.worker_addresses())

        # The stage-1 pod is replaced: deleted, re-created without an IP, then Ready elsewhere.
        kube.apply("MODIFIED", make_pod("fs-worker-1", "10.0.0.11", deleting=True))
        kube.apply("DELETED", make_pod("fs-worker-1", "10.0.0.11", deleting=True))
        kube.apply("ADDED", make_pod("fs-worker-1", None, ready=False, node="node-c"))
        kube.apply("MODIFIED", make_pod("fs-worker-1", "10.0.0.21", node="node-c"))
        wait_until(lambda: discovery.worker_addresses().get(1) == "10.0.0.21:50061")
    finally:
        discovery.stop()
    assert any(1 not in e.worker_addresses for e in seen[1:]), "the gap was published"
    assert seen[-1] == Endpoints(
        {0: "10.0.0.10:50061", 1: "10.0.0.21:50061", 2: "10.0.0.12:50061"}, "10.0.1.1:50071"
    )
    assert sorted(kube.lists) == sorted([WORKERS, KVSTORES]), "later changes came by watch"
    assert all(version for version in kube.watch_versions), "watches resume from a version"


def test_watch_resumes_on_expiry_and_relists_after_gone(kube):
    kube.apply("ADDED", make_pod("fs-worker-0", "10.0.0.10"))
    discovery = make_discovery(kube, watch_timeout_s=1)
    discovery.start()
    try:
        discovery.wait_for_workers(1, timeout_s=5)
        # The server ends each watch after timeoutSeconds: the client resumes, not re-lists.
        wait_until(lambda: len(kube.watch_versions) >= 4, timeout_s=5)
        assert kube.lists.count(WORKERS) == 1
        # History compacted: resuming gets 410 Gone, so the client lists again.
        kube.compact()
        kube.apply("MODIFIED", make_pod("fs-worker-0", "10.0.0.30"))
        kube.compact()
        kube.end_watches()
        wait_until(lambda: discovery.worker_addresses() == {0: "10.0.0.30:50061"})
        assert kube.lists.count(WORKERS) == 2
    finally:
        discovery.stop()


def test_api_errors_are_retried(kube):
    kube.fail_next_lists = 3
    kube.apply("ADDED", make_pod("fs-worker-0", "10.0.0.10"))
    discovery = make_discovery(kube)
    discovery.start()
    try:
        assert discovery.wait_for_workers(1, timeout_s=5) == {0: "10.0.0.10:50061"}
    finally:
        discovery.stop()


def test_stage_index_from_label_then_name_and_stop_is_prompt(kube):
    kube.apply("ADDED", make_pod("renamed", "10.0.0.13", labels={POD_INDEX_LABEL: "3"}))
    kube.apply("ADDED", make_pod("fs-worker-0", "fd00::5"))
    kube.apply("ADDED", make_pod("no-ordinal", "10.0.0.99"))
    discovery = make_discovery(kube, watch_timeout_s=60)
    discovery.start()
    try:
        wait_until(
            lambda: discovery.worker_addresses() == {0: "[fd00::5]:50061", 3: "10.0.0.13:50061"}
        )
        assert discovery.kvstore_address() is None
    finally:
        started = time.monotonic()
        discovery.stop()
    assert time.monotonic() - started < 3, "stop() must not wait for the watch to time out"


def test_static_discovery():
    discovery = StaticDiscovery(["10.1.0.1:50061", "10.1.0.2:50061"], "10.1.0.9:50071")
    calls = []
    discovery.subscribe(calls.append)
    discovery.start()
    assert discovery.worker_addresses() == {0: "10.1.0.1:50061", 1: "10.1.0.2:50061"}
    assert discovery.kvstore_address() == "10.1.0.9:50071"
    assert discovery.wait_for_workers(2, timeout_s=0) == discovery.worker_addresses()
    with pytest.raises(TimeoutError, match="ready: \\[0, 1\\]"):
        discovery.wait_for_workers(3, timeout_s=0.05)
    discovery.stop()
    assert calls == []  # static addresses never change


def scheduler_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker-address", default="127.0.0.1:50061")
    parser.add_argument("--kvstore-address", default="127.0.0.1:50071")
    add_discovery_arguments(parser)
    return parser


def test_discovery_from_args_static():
    args = scheduler_parser().parse_args(
        ["--worker-address", "a:1, b:2", "--kvstore-address", "k:3"]
    )
    discovery = discovery_from_args(args)
    assert isinstance(discovery, StaticDiscovery)
    assert discovery.worker_addresses() == {0: "a:1", 1: "b:2"}
    assert discovery.kvstore_address() == "k:3"


def test_discovery_from_args_kubernetes_reads_env(monkeypatch):
    monkeypatch.setenv("FASTSERVE_DISCOVERY", "kubernetes")
    monkeypatch.setenv("FASTSERVE_NAMESPACE", "serving")
    monkeypatch.setenv("FASTSERVE_WORKER_SELECTOR", "app.kubernetes.io/instance=r1")
    args = scheduler_parser().parse_args(
        ["--worker-address", "r1-worker-0.r1-worker-headless:7001", "--kvstore-address", "kv:7002"]
    )
    discovery = discovery_from_args(args)
    assert isinstance(discovery, KubernetesDiscovery)
    assert discovery.namespace == "serving"
    assert (discovery.worker_port, discovery.kvstore_port) == (7001, 7002)
    assert discovery._workers.selector == "app.kubernetes.io/instance=r1"
    assert discovery.worker_addresses() == {}  # nothing until start()
