"""The chart's optional Gateway API Inference Extension and KEDA resources: an InferencePool over
the frontends' HTTP port with its endpoint picker (EPP), and a KEDA ScaledObject on the frontend
Deployment. Rendered with the real helm, the custom resources validated offline against the
vendored CRDs' openAPIV3Schema (tests/deploy/crds/README.md says which versions), everything else
against the Kubernetes schema, and the wiring read back: what the pool selects, where the EPP
listens, and that the metric names the EPP reads are the ones the frontend serves."""

from __future__ import annotations

import copy
import functools
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.frontend.metrics import PROTOCOL_METRICS
from tests.deploy.chart import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    WORKLOAD_KINDS,
    container,
    named_port,
    of_kind,
    pod_labels,
    selects,
    service,
    workload,
)

CRDS = Path(__file__).parent / "crds"
POOL = ("inferencePool.enabled=true",)
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
KEDA = ("keda.enabled=true", f"keda.serverAddress={PROMETHEUS}")


def render(helm, *sets: str, release: str = RELEASE) -> list[dict]:
    done = _helm(helm, "template", release, *sets)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def render_error(helm, *sets: str) -> str:
    done = _helm(helm, "template", RELEASE, *sets)
    assert done.returncode != 0, "the chart rendered"
    return done.stderr


def _helm(helm, command: str, release: str, *sets: str) -> subprocess.CompletedProcess:
    argv = [str(helm), command, release, str(CHART), "-n", NAMESPACE]
    argv += ["--kube-version", KUBE_VERSION]
    for item in sets:
        argv += ["--set", item]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


# --- offline validation against the vendored CRDs -------------------------------------------


def _strict(schema):
    """A CRD's structural schema as a JSON Schema that refuses unknown fields (the API server's
    strict field validation; it would otherwise drop them silently) and knows int-or-string."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(filename: str, version: str) -> jsonschema.protocols.Validator:
    crd = yaml.safe_load((CRDS / filename).read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"], f"{filename}: {version} is not served"
    schema = _strict(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    """Schema errors of a rendered custom resource, plus the CEL rules its CRD states (the
    validator cannot run CEL; each rule here is the CRD's, spelled out)."""
    group, version = doc["apiVersion"].split("/")
    filename = {
        "inference.networking.k8s.io": "inference.networking.k8s.io_inferencepools.yaml",
        "keda.sh": "keda.sh_scaledobjects.yaml",
    }[group]
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in crd_validator(filename, version).iter_errors(doc)
    ]
    spec = doc.get("spec", {})
    if doc["kind"] == "InferencePool":
        numbers = [p.get("number") for p in spec.get("targetPorts", [])]
        if len(set(numbers)) != len(numbers):
            errors.append("spec.targetPorts: port number must be unique")
        ref = spec.get("endpointPickerRef", {})
        if ref.get("kind", "Service") == "Service" and "port" not in ref:
            errors.append("spec.endpointPickerRef: port is required when kind is 'Service'")
    if doc["kind"] == "ScaledObject" and (
        spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100)
    ):
        errors.append("spec: minReplicaCount must be less than or equal to maxReplicaCount")
    return errors


def assert_valid(docs: list[dict]) -> None:
    for doc in docs:
        if doc["apiVersion"].split("/")[0] in ("inference.networking.k8s.io", "keda.sh"):
            assert crd_errors(doc) == [], doc["kind"]
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_validation_against_the_crds_catches_mistakes(helm):
    (pool,) = of_kind(render(helm, *POOL), "InferencePool")
    assert crd_errors(pool) == []
    for path, value, wanted in (
        (("spec", "targetPorts"), [{"number": 8000}, {"number": 8000}], "unique"),
        (("spec", "targetPorts"), [{"number": 70000}], "70000"),
        (("spec", "endpointPickerRef", "failureMode"), "FailSometimes", "FailSometimes"),
        (("spec", "selector", "labels"), {"a": "b"}, "labels"),  # not a field of the schema
    ):
        broken = copy.deepcopy(pool)
        *parents, leaf = path
        node = broken
        for key in parents:
            node = node[key]
        node[leaf] = value
        assert any(wanted in error for error in crd_errors(broken)), (path, crd_errors(broken))
    (scaled,) = of_kind(render(helm, *KEDA), "ScaledObject")
    assert crd_errors(scaled) == []
    broken = copy.deepcopy(scaled)
    broken["spec"]["triggers"][0]["metadata"]["threshold"] = 8  # must be a string
    assert crd_errors(broken)
    broken["spec"].update(minReplicaCount=5, maxReplicaCount=2)
    assert any("minReplicaCount" in error for error in crd_errors(broken))


# --- off by default ------------------------------------------------------------------------


def test_nothing_is_rendered_by_default(helm):
    docs = render(helm)
    assert not of_kind(docs, "InferencePool") and not of_kind(docs, "ScaledObject")
    names = {d["metadata"]["name"] for d in docs}
    assert not any(name.endswith("-epp") for name in names)


# --- InferencePool and endpoint picker -----------------------------------------------------


def epp_parts(docs: list[dict]) -> tuple[dict, dict, dict]:
    """(EPP Deployment, its container, its parsed EndpointPickerConfig)."""
    (deployment,) = [
        d
        for d in of_kind(docs, "Deployment")
        if pod_labels(d).get("app.kubernetes.io/component") == "endpoint-picker"
    ]
    ctr = container(deployment)
    args = ctr["args"]
    path = Path(args[args.index("--config-file") + 1])
    volume = {m["name"]: m["mountPath"] for m in ctr["volumeMounts"]}
    (mount_name,) = [name for name, mount in volume.items() if mount == str(path.parent)]
    (source,) = [
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount_name
    ]
    (config_map,) = [
        c
        for c in of_kind(docs, "ConfigMap")
        if c["metadata"]["name"] == source["configMap"]["name"]
    ]
    return deployment, ctr, yaml.safe_load(config_map["data"][path.name])


def arg(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name}: {args}"
    return args[args.index(name) + 1]


def test_pool_and_epp_render_and_validate(helm):
    docs = render(helm, *POOL)
    assert_valid(docs)
    (pool,) = of_kind(docs, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    lint = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION]
        + [x for item in (*POOL, *KEDA) for x in ("--set", item)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_pool_selects_the_frontends_on_their_http_port(helm):
    docs = render(helm, *POOL, "frontend.http.port=8080")
    (pool,) = of_kind(docs, "InferencePool")
    spec = pool["spec"]
    selected = [
        w
        for w in docs
        if w["kind"] in WORKLOAD_KINDS and selects(spec["selector"]["matchLabels"], pod_labels(w))
    ]
    assert [pod_labels(w)["app.kubernetes.io/component"] for w in selected] == ["frontend"]
    frontend = container(workload(docs, "frontend"))
    assert spec["targetPorts"] == [{"number": named_port(frontend, "http")}] == [{"number": 8080}]
    assert spec["appProtocol"] == "http"
    # /metrics, which the EPP scrapes on the first target port, is served there.
    assert arg(frontend["args"], "--http-port") == "8080"


def test_epp_is_the_service_the_pool_names_and_watches_this_pool(helm):
    docs = render(helm, *POOL, "inferencePool.name=smollm")
    (pool,) = of_kind(docs, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["failureMode"] == "FailOpen"
    svc = service(docs, ref["name"])
    deployment, ctr, _ = epp_parts(docs)
    assert selects(svc["spec"]["selector"], pod_labels(deployment))
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    grpc_port = named_port(ctr, port["targetPort"])
    assert int(arg(ctr["args"], "--grpc-port")) == grpc_port
    assert arg(ctr["args"], "--pool-name") == pool["metadata"]["name"] == "smollm"
    assert arg(ctr["args"], "--pool-namespace") == NAMESPACE
    assert arg(ctr["args"], "--pool-group") == "inference.networking.k8s.io"
    health = int(arg(ctr["args"], "--grpc-health-port"))
    assert ctr["readinessProbe"]["grpc"]["port"] == ctr["livenessProbe"]["grpc"]["port"] == health
    assert deployment["spec"]["replicas"] == 1


def test_epp_may_read_the_pool_and_its_pods(helm):
    docs = render(helm, *POOL)
    deployment, _, _ = epp_parts(docs)
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert account in {a["metadata"]["name"] for a in of_kind(docs, "ServiceAccount")}
    (binding,) = [
        b
        for b in of_kind(docs, "RoleBinding")
        if {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in b["subjects"]
    ]
    (role,) = [
        r for r in of_kind(docs, "Role") if r["metadata"]["name"] == binding["roleRef"]["name"]
    ]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for group, resource in (("", "pods"), ("inference.networking.k8s.io", "inferencepools")):
        for verb in ("get", "list", "watch"):
            assert (group, resource, verb) in granted
    assert not any(verb not in ("get", "list", "watch") for _, _, verb in granted)


def test_epp_reads_the_metric_names_the_frontend_serves(helm):
    _, ctr, config = epp_parts(render(helm, *POOL))
    assert not any(a.endswith("-metric") for a in ctr["args"])  # EPP >= 1.4 refuses them
    plugins = {p["type"]: p for p in config["plugins"]}
    extractor = plugins["core-metrics-extractor"]["parameters"]
    (engine,) = extractor["engineConfigs"]
    assert extractor["defaultEngine"] == engine["name"]
    assert engine == {
        "name": engine["name"],
        "queuedRequestsSpec": PROTOCOL_METRICS["queued_requests"],
        "runningRequestsSpec": PROTOCOL_METRICS["running_requests"],
        "kvUsageSpec": PROTOCOL_METRICS["kv_cache_usage"],
        "cacheInfoSpec": PROTOCOL_METRICS["cache_config_info"],
        "loraSpec": "",  # no LoRA adapters
    }
    assert plugins["metrics-data-source"]["parameters"]["path"] == "/metrics"
    refs = {r["pluginRef"] for profile in config["schedulingProfiles"] for r in profile["plugins"]}
    assert refs <= set(plugins)
    assert {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"} <= refs


def test_older_epps_get_the_metric_names_as_flags(helm):
    docs = render(helm, *POOL, "inferencePool.epp.metricNamesVia=flags")
    assert_valid(docs)
    _, ctr, config = epp_parts(docs)
    args = ctr["args"]
    assert arg(args, "--total-queued-requests-metric") == PROTOCOL_METRICS["queued_requests"]
    assert arg(args, "--total-running-requests-metric") == PROTOCOL_METRICS["running_requests"]
    assert arg(args, "--kv-cache-usage-percentage-metric") == PROTOCOL_METRICS["kv_cache_usage"]
    assert arg(args, "--cache-info-metric") == PROTOCOL_METRICS["cache_config_info"]
    assert arg(args, "--lora-info-metric") == ""
    types = {p["type"] for p in config["plugins"]}
    assert "core-metrics-extractor" not in types  # unknown to those versions


def test_the_releases_network_policy_leaves_the_epp_reachable(helm):
    docs = render(helm, *POOL)
    deployment, _, _ = epp_parts(docs)
    labels = pod_labels(deployment)
    for policy in of_kind(docs, "NetworkPolicy"):
        assert not selects(policy["spec"]["podSelector"].get("matchLabels", {}), labels), policy[
            "metadata"
        ]["name"]


def test_one_pool_over_several_releases(helm):
    """docs/deploy/scale-out.md's releases: one model's releases share a nameOverride, and the
    pool of the first (selectReleases=name) selects every one's frontends and nothing else."""
    first = render(
        helm,
        "nameOverride=smollm",
        *POOL,
        "inferencePool.name=smollm",
        "inferencePool.selectReleases=name",
        release="smollm-a",
    )
    second = render(helm, "nameOverride=smollm", release="smollm-b")
    other_model = render(helm, "nameOverride=llama", release="llama-a")
    (pool,) = of_kind(first, "InferencePool")
    assert pool["metadata"]["name"] == "smollm"
    assert pool["spec"]["endpointPickerRef"]["name"] == "smollm-a-epp"
    deployment, _, _ = epp_parts(first)
    assert deployment["metadata"]["name"] == "smollm-a-epp"
    assert pod_labels(deployment)["app.kubernetes.io/name"] == "smollm-epp"
    selector = pool["spec"]["selector"]["matchLabels"]
    selected = [
        (w["metadata"]["name"], pod_labels(w)["app.kubernetes.io/component"])
        for w in (*first, *second, *other_model)
        if w["kind"] in WORKLOAD_KINDS and selects(selector, pod_labels(w))
    ]
    assert selected == [("smollm-a-frontend", "frontend"), ("smollm-b-frontend", "frontend")]
    assert not of_kind(second, "InferencePool")
    # The default selects its own release only.
    (own,) = of_kind(
        render(helm, "nameOverride=smollm", *POOL, release="smollm-a"), "InferencePool"
    )
    own_selector = own["spec"]["selector"]["matchLabels"]
    assert selects(own_selector, pod_labels(workload(first, "frontend")))
    assert not selects(own_selector, pod_labels(workload(second, "frontend")))


def test_the_guide_names_what_the_chart_serves():
    guide = (CHART.parents[2] / "docs" / "deploy" / "scale-out.md").read_text()
    for name in PROTOCOL_METRICS.values():
        assert f"`{name}" in guide, name
    values = (CHART / "values.yaml").read_text()
    assert "docs/deploy/scale-out.md" in values


def test_pool_refuses_a_frontend_without_http(helm):
    assert "frontend.http.enabled" in render_error(helm, *POOL, "frontend.http.enabled=false")
    error = render_error(helm, *POOL, "inferencePool.selectReleases=all")
    assert "selectReleases" in error


# --- KEDA ------------------------------------------------------------------------------------


def test_scaled_object_scales_the_frontend_on_the_queue(helm):
    docs = render(helm, *KEDA, "keda.minReplicas=1", "keda.maxReplicas=6", "keda.threshold=4")
    assert_valid(docs)
    (scaled,) = of_kind(docs, "ScaledObject")
    spec = scaled["spec"]
    frontend = workload(docs, "frontend")
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        frontend["apiVersion"],
        frontend["kind"],
        frontend["metadata"]["name"],
    )
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 6)
    assert "replicas" not in frontend["spec"]  # KEDA owns the count; an upgrade must not reset it
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert meta["serverAddress"] == PROMETHEUS
    assert meta["threshold"] == "4"
    # Every frontend reports the same replica's queue: the query takes the largest, over this
    # release's frontend Service (the job the chart's ServiceMonitor scrapes).
    svc = service(docs, frontend["metadata"]["name"])
    assert meta["query"] == (
        f"max({PROTOCOL_METRICS['queued_requests']}"
        f'{{namespace="{NAMESPACE}",service="{svc["metadata"]["name"]}"}})'
    )
    assert not of_kind(docs, "HorizontalPodAutoscaler")


def test_scaled_object_takes_a_query_of_ones_own(helm):
    query = "sum(fastserve_requests_in_flight{namespace='serving'})"
    (scaled,) = of_kind(render(helm, *KEDA, f"keda.query={query}"), "ScaledObject")
    assert scaled["spec"]["triggers"][0]["metadata"]["query"] == query


def test_hpa_and_scaled_object_are_refused_together(helm):
    error = render_error(helm, *KEDA, "frontend.autoscaling.enabled=true")
    assert "frontend.autoscaling.enabled and keda.enabled" in error
    # Either alone renders.
    assert of_kind(render(helm, "frontend.autoscaling.enabled=true"), "HorizontalPodAutoscaler")
    assert "keda.serverAddress" in render_error(helm, "keda.enabled=true")
    assert "minReplicas" in render_error(helm, *KEDA, "keda.minReplicas=0")


@pytest.mark.parametrize("sets", [POOL, KEDA, (*POOL, *KEDA)])
def test_every_manifest_validates(helm, sets):
    assert_valid(render(helm, *sets))
