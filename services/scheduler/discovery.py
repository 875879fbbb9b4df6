"""Where the scheduler finds its worker stages and the kvstore: static flags or the Kubernetes API.

In a cluster the workers are a StatefulSet whose pod ordinal is the stage index, and the kvstore
is a DaemonSet (one pod per node). `KubernetesDiscovery` lists the pods that match each label
selector, then watches them, so a stage pod that is replaced (new IP) is picked up without
restarting anything. Only Ready pods with an IP that are not being deleted count. Outside a
cluster `StaticDiscovery` serves the addresses given by flags. Both have the same interface:
`worker_addresses()`, `kvstore_address()`, `subscribe(callback)`, `start()` / `stop()`.

Wiring into `fastserve scheduler` (services/scheduler/main.py):

    add_discovery_arguments(parser)                     # in add_arguments
    discovery = discovery_from_args(args)               # in run
    discovery.start()
    stages = discovery.wait_for_workers(1, args.worker_timeout)
    discovery.subscribe(on_endpoints)                   # runs on the watch thread
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.flags import add_flag

log = logging.getLogger(__name__)

POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"  # set by the StatefulSet controller (k8s 1.28+)
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_WORKER_SELECTOR = "app.kubernetes.io/name=fastserve,app.kubernetes.io/component=worker"
DEFAULT_KVSTORE_SELECTOR = "app.kubernetes.io/name=fastserve,app.kubernetes.io/component=kvstore"
DEFAULT_WORKER_PORT = 50061
DEFAULT_KVSTORE_PORT = 50071
MAX_RETRY_DELAY_S = 30.0


@dataclass(frozen=True, slots=True)
class Endpoints:
    """What the scheduler can reach now."""

    worker_addresses: dict[int, str] = field(default_factory=dict)  # stage index -> host:port
    kvstore_address: str | None = None  # None while no kvstore is known


Callback = Callable[[Endpoints], None]


class _Discovery:
    """Current endpoints, change notification, and waiting; subclasses call `_publish`."""

    def __init__(self) -> None:
        self._current = Endpoints()
        self._changed = threading.Condition()
        self._callbacks: list[Callback] = []
        # NOTE: callbacks run on a watch thread; this lock keeps them in publication order when
        # the worker and kvstore watches change at the same time.
        self._notify_lock = threading.Lock()

    def endpoints(self) -> Endpoints:
        with self._changed:
            return self._current

    def worker_addresses(self) -> dict[int, str]:
        """Stage index -> host:port of every known stage."""
        return dict(self.endpoints().worker_addresses)

    def kvstore_address(self) -> str | None:
        return self.endpoints().kvstore_address

    def subscribe(self, callback: Callback) -> Callable[[], None]:
        """Calls `callback(endpoints)` after every change; returns a function that unsubscribes.
        The callback runs on the discovery thread: keep it short and never let it block."""
        with self._changed:
            self._callbacks.append(callback)

        def unsubscribe() -> None:
            with self._changed:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    def wait_for_workers(self, num_stages: int, timeout_s: float) -> dict[int, str]:
        """Blocks until stages 0..num_stages-1 are all known; raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not all(i in self._current.worker_addresses for i in range(num_stages)):
                left = deadline - time.monotonic()
                if left <= 0:
                    known = sorted(self._current.worker_addresses)
                    raise TimeoutError(
                        f"discovery: {num_stages} worker stage(s) not ready after {timeout_s}s "
                        f"(ready: {known or 'none'})"
                    )
                self._changed.wait(left)
            return dict(self._current.worker_addresses)

    def start(self) -> None:
        """Starts following changes (nothing to do for static addresses)."""

    def stop(self) -> None:
        """Stops following changes."""

    def _publish(self, endpoints: Endpoints) -> None:
        with self._notify_lock:
            with self._changed:
                if endpoints == self._current:
                    return
                self._current = endpoints
                callbacks = list(self._callbacks)
                self._changed.notify_all()
            log.info(
                "discovery: workers %s, kvstore %s",
                endpoints.worker_addresses or "none",
                endpoints.kvstore_address or "none",
            )
            for callback in callbacks:
                try:
                    callback(endpoints)
                except Exception:
                    log.exception("discovery subscriber failed")


class StaticDiscovery(_Discovery):
    """Fixed addresses from flags: `worker_addresses[i]` is stage i."""

    def __init__(self, worker_addresses: list[str], kvstore_address: str | None) -> None:
        super().__init__()
        self._publish(Endpoints(dict(enumerate(worker_addresses)), kvstore_address or None))


class KubernetesDiscovery(_Discovery):
    """Worker stages and the kvstore from pods selected by label, followed by list + watch.

    `api` is a `kubernetes.client.CoreV1Api`; without one, `start()` loads the in-cluster config
    (or ~/.kube/config). The kvstore chosen is the one on the node of stage 0, else the first
    Ready one by name: each node runs its own kvstore, and stage 0 is where swaps start.
    """

    def __init__(
        self,
        namespace: str,
        worker_selector: str,
        kvstore_selector: str,
        worker_port: int = DEFAULT_WORKER_PORT,
        kvstore_port: int = DEFAULT_KVSTORE_PORT,
        api: Any = None,
        *,
        watch_timeout_s: int = 240,
        retry_delay_s: float = 1.0,
    ) -> None:
        super().__init__()
        self.namespace = namespace
        self.worker_port = worker_port
        self.kvstore_port = kvstore_port
        self._api = api
        self._ignored_uids: set[str] = set()  # pods without a stage index, warned about once
        # Both watch threads refresh; computing and publishing under one lock keeps a stale
        # snapshot from being published after a newer one.
        self._refresh_lock = threading.Lock()
        options = dict(watch_timeout_s=watch_timeout_s, retry_delay_s=retry_delay_s)
        self._workers = _PodWatch("workers", namespace, worker_selector, self._refresh, **options)
        self._kvstores = _PodWatch("kvstore", namespace, kvstore_selector, self._refresh, **options)

    def start(self) -> None:
        if self._api is None:
            self._api = _load_core_api()
        self._workers.start(self._api)
        self._kvstores.start(self._api)

    def stop(self) -> None:
        self._workers.stop()
        self._kvstores.stop()

    def _refresh(self) -> None:
        with self._refresh_lock:
            self._publish(self._snapshot())

    def _snapshot(self) -> Endpoints:
        stages = _stage_pods(self._workers.ready_pods(), self._ignored_uids)
        workers = {i: _address(pod, self.worker_port) for i, pod in stages.items()}
        stage0_node = stages[0].spec.node_name if 0 in stages and stages[0].spec else None
        kvstores = sorted(self._kvstores.ready_pods(), key=lambda p: p.metadata.name)
        local = [p for p in kvstores if p.spec and p.spec.node_name == stage0_node]
        chosen = (local or kvstores or [None])[0]
        kvstore = _address(chosen, self.kvstore_port) if chosen is not None else None
        return Endpoints(workers, kvstore)


class _PodWatch:
    """The pods matching one label selector, kept current on a background thread.

    List, then watch from the list's resourceVersion. A watch that ends (server timeout) resumes
    from the last resourceVersion seen (bookmarks keep it fresh); 410 Gone (too old) or an API
    error re-lists; transport errors retry with capped exponential backoff.
    """

    def __init__(
        self,
        name: str,
        namespace: str,
        selector: str,
        on_change: Callable[[], None],
        *,
        watch_timeout_s: int,
        retry_delay_s: float,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.selector = selector
        self._on_change = on_change
        self._watch_timeout_s = watch_timeout_s
        self._retry_delay_s = retry_delay_s
        self._api: Any = None
        self._pods: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None

    def ready_pods(self) -> list[Any]:
        with self._lock:
            return [pod for pod in self._pods.values() if is_ready(pod)]

    def start(self, api: Any) -> None:
        self._api = api
        self._stopped.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"discovery-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        deadline = time.monotonic() + timeout_s
        # NOTE: Watch.stop() shuts the socket of the request in flight, so a blocked read returns;
        # a watch whose request was not yet sent would miss it, hence the retries.
        while self._thread is not None and self._thread.is_alive():
            if self._watch is not None:
                self._watch.stop()
            self._thread.join(timeout=0.05)
            if time.monotonic() > deadline:
                log.warning("discovery %s: watch thread did not stop", self.name)
                break

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        resource_version: str | None = None
        delay = self._retry_delay_s
        while not self._stopped.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list()
                resource_version = self._follow(resource_version)
                delay = self._retry_delay_s
            except ApiException as exc:
                if exc.status == 410:
                    log.info("discovery %s: watch expired; re-listing", self.name)
                    resource_version = None
                    continue
                log.warning("discovery %s: API error %s %s", self.name, exc.status, exc.reason)
                resource_version = None
                delay = self._back_off(delay)
            except Exception as exc:
                if self._stopped.is_set():
                    break
                log.warning("discovery %s: %s: %s", self.name, type(exc).__name__, exc)
                delay = self._back_off(delay)

    def _back_off(self, delay: float) -> float:
        self._stopped.wait(delay)
        return min(delay * 2, MAX_RETRY_DELAY_S)

    def _list(self) -> str:
        pod_list = self._api.list_namespaced_pod(self.namespace, label_selector=self.selector)
        with self._lock:
            self._pods = {pod.metadata.name: pod for pod in pod_list.items}
        self._on_change()
        return str(pod_list.metadata.resource_version)

    def _follow(self, resource_version: str) -> str:
        from kubernetes import watch

        self._watch = watcher = watch.Watch()
        if self._stopped.is_set():
            return resource_version
        events = watcher.stream(
            self._api.list_namespaced_pod,
            self.namespace,
            label_selector=self.selector,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout_s,
            _request_timeout=self._watch_timeout_s + 30,
        )
        for event in events:
            kind, pod = event["type"], event["object"]
            if kind not in ("ADDED", "MODIFIED", "DELETED"):
                continue  # BOOKMARK: the client already took its resourceVersion
            with self._lock:
                if kind == "DELETED":
                    self._pods.pop(pod.metadata.name, None)
                else:
                    self._pods[pod.metadata.name] = pod
            self._on_change()
        return str(watcher.resource_version or resource_version)


def is_ready(pod: Any) -> bool:
    """Ready condition True, an IP, and not being deleted."""
    status = pod.status
    if pod.metadata.deletion_timestamp is not None or status is None or not status.pod_ip:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def stage_index(pod: Any) -> int | None:
    """The StatefulSet ordinal: the pod-index label, else the pod name's numeric suffix."""
    raw = (pod.metadata.labels or {}).get(POD_INDEX_LABEL) or pod.metadata.name.rsplit("-", 1)[-1]
    return int(raw) if raw.isdigit() else None


def _stage_pods(pods: Iterable[Any], ignored_uids: set[str]) -> dict[int, Any]:
    stages: dict[int, Any] = {}
    # Newest last, so if two Ready pods claim one ordinal (a replacement racing its
    # predecessor's deletion) the newer one wins.
    for pod in sorted(pods, key=lambda p: str(p.metadata.creation_timestamp or "")):
        index = stage_index(pod)
        if index is not None:
            stages[index] = pod
        elif pod.metadata.uid not in ignored_uids:
            ignored_uids.add(pod.metadata.uid)
            log.warning("discovery: pod %s has no stage index; ignored", pod.metadata.name)
    return stages


def _address(pod: Any, port: int) -> str:
    ip = pod.status.pod_ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _load_core_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api()


def add_discovery_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for `fastserve scheduler`; each also reads FASTSERVE_<FLAG>."""
    add_flag(
        parser,
        "--discovery",
        default="static",
        choices=("static", "kubernetes"),
        help="static: --worker-address / --kvstore-address; kubernetes: pods by label selector "
        "(ports taken from those two flags)",
    )
    add_flag(parser, "--namespace", default="", help="pods' namespace (default: this pod's)")
    add_flag(parser, "--worker-selector", default=DEFAULT_WORKER_SELECTOR, help="worker pods")
    add_flag(parser, "--kvstore-selector", default=DEFAULT_KVSTORE_SELECTOR, help="kvstore pods")


def discovery_from_args(args: argparse.Namespace) -> StaticDiscovery | KubernetesDiscovery:
    """The discovery the flags ask for; `--worker-address` may list stages, comma-separated."""
    workers = [a.strip() for a in args.worker_address.split(",") if a.strip()]
    if args.discovery == "static":
        return StaticDiscovery(workers, args.kvstore_address)
    return KubernetesDiscovery(
        namespace=args.namespace or _own_namespace(),
        worker_selector=args.worker_selector,
        kvstore_selector=args.kvstore_selector,
        worker_port=_port_of(workers[0] if workers else "", DEFAULT_WORKER_PORT),
        kvstore_port=_port_of(args.kvstore_address or "", DEFAULT_KVSTORE_PORT),
    )


def _own_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def _port_of(address: str, default: int) -> int:
    _, sep, port = address.rpartition(":")
    return int(port) if sep and port.isdigit() else default
