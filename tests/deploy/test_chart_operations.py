"""charts/tailor, operations: PodDisruptionBudgets, NetworkPolicies, bundled or external store and database,
Triton, ServiceMonitor and the Grafana dashboard. Rendered offline (helm template); no cluster ran, so the
NetworkPolicies are checked by evaluating their selectors here, not by a CNI."""

from __future__ import annotations

import json

import pytest
from deploy_support import CHART, VALUE_SETS, rendered, value_set_id

value_sets = pytest.mark.parametrize("values", VALUE_SETS, ids=value_set_id)
RELEASE = {"app.kubernetes.io/name": "tailor", "app.kubernetes.io/instance": "tailor"}
WORKERS = ("quantizer", "trainer", "benchmarker", "exporter", "selector")
METRICS = ("tailor_rpc_requests_total", "tailor_rpc_latency_seconds", "tailor_operations")
METRICS += ("tailor_stage_duration_seconds", "tailor_gateway_queue_depth")


def _kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def _component(obj):
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def _selects(selector, labels):
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))


def _pods(objects):
    """{component: pod labels} of every workload, plus the `helm test` pod and a pod outside the release."""
    pods = {}
    for w in _kind(objects, "Deployment") + _kind(objects, "StatefulSet"):
        pods[w["metadata"]["name"]] = w["spec"]["template"]["metadata"]["labels"]
    return pods


def _admitted(policy, labels, port, same_namespace=True):
    """Whether the policy lets a pod with these labels (same namespace) reach the named port."""
    for rule in policy["spec"].get("ingress", []):
        if port not in {p["port"] for p in rule.get("ports", [])}:
            continue
        peers = rule.get("from")
        if peers is None:
            return True
        for peer in peers:
            if "namespaceSelector" in peer:
                continue  # another namespace (monitoring, ingress): not one of ours
            if same_namespace and _selects(peer["podSelector"], labels):
                return True
    return False


@value_sets
def test_every_deployment_has_a_disruption_budget(helm, values):
    objects = rendered(values)
    budgets = _kind(objects, "PodDisruptionBudget")
    if not budgets:
        assert value_set_id(values) == "minimal-values.yaml"  # podDisruptionBudget.enabled=false there
        return
    deployments = _kind(objects, "Deployment")
    for deployment in deployments:
        pods = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if _selects(b["spec"]["selector"], pods)]
        assert len(matching) == 1, deployment["metadata"]["name"]
        assert matching[0]["spec"]["maxUnavailable"] == 1
    assert len(budgets) == len(deployments)


@value_sets
def test_network_policies_let_only_the_gateway_in_from_outside(helm, values):
    objects = rendered(values)
    policies = _kind(objects, "NetworkPolicy")
    if not policies:
        assert value_set_id(values) == "minimal-values.yaml"
        return
    pods = _pods(objects)
    outsider = {"app.kubernetes.io/name": "something-else"}
    other_release = {
        **RELEASE,
        "app.kubernetes.io/instance": "other",
        "app.kubernetes.io/component": "gateway",
    }
    helm_test = {**RELEASE, "app.kubernetes.io/component": "test", "tailor.dev/helm-test-hook": "true"}
    forged_test = {**RELEASE, "app.kubernetes.io/component": "test"}  # the label alone, without the hook's
    for name, labels in pods.items():
        mine = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert len(mine) == 1, f"{name}: exactly one policy isolates it"
        policy = mine[0]
        component = labels["app.kubernetes.io/component"]
        # only the web front's egress is fenced (test_chart_web.py checks where it may go)
        assert policy["spec"]["policyTypes"] == (["Ingress", "Egress"] if component == "web" else ["Ingress"])
        port = {"minio": "s3", "postgresql": "postgresql", "web": "http"}.get(component, "grpc")
        callers = {n: _admitted(policy, pod, port) for n, pod in pods.items()}
        if component == "web":
            # an entry point like the gateway: from anywhere unless networkPolicy.webFrom names who (the
            # Ingress controller's namespace, in external-values.yaml); the `helm test` pod either way
            restricted = value_set_id(values) == "external-values.yaml"
            assert _admitted(policy, outsider, port) == (not restricted)
            assert not any(callers.values()) if restricted else all(callers.values())
            assert _admitted(policy, other_release, port) == (not restricted)
            assert _admitted(policy, helm_test, port)
        elif component == "gateway":
            rule = next(
                r for r in policy["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]
            )
            restricted = value_set_id(values) == "external-values.yaml"  # networkPolicy.gatewayFrom set there
            assert ("from" in rule) == restricted
            assert _admitted(policy, outsider, "grpc") == ("from" not in rule)
            # the web front reaches it whatever gatewayFrom says
            web_pods = {n for n, pod in pods.items() if pod["app.kubernetes.io/component"] == "web"}
            assert web_pods and all(callers[n] for n in web_pods)
        elif component in WORKERS or component == "postgresql":
            gateway_pods = {n for n, pod in pods.items() if pod["app.kubernetes.io/component"] == "gateway"}
            assert {n for n, ok in callers.items() if ok} == gateway_pods, f"{name}: from the gateway only"
            assert not _admitted(policy, forged_test, port) and not _admitted(policy, other_release, port)
            if component == "postgresql":
                assert _admitted(policy, helm_test, port)  # `helm test` only connects
            else:
                assert not _admitted(policy, helm_test, port), f"{name}: the test pod never reaches a stage"
                assert _admitted(policy, helm_test, "health")  # `helm test` checks its health
                assert not _admitted(policy, forged_test, "health")
        else:  # triton, minio: every pod of this release, nobody else
            assert all(callers.values()), f"{name}: every pod of the release"
            assert not _admitted(policy, outsider, port) and not _admitted(policy, other_release, port)
        # Prometheus (networkPolicy.metricsFrom, a namespace) may scrape every metrics port
        if component not in ("minio", "postgresql", "web"):  # the web front serves no /metrics
            rules = [
                r for r in policy["spec"]["ingress"] if {"port": "metrics", "protocol": "TCP"} in r["ports"]
            ]
            assert rules and all("namespaceSelector" in peer for peer in rules[0]["from"])


@pytest.mark.parametrize(
    ("values", "minio", "postgresql"),
    [
        (None, True, False),
        (CHART / "ci" / "cpu-values.yaml", True, False),
        (CHART / "ci" / "gpu-values.yaml", True, True),
        (CHART / "ci" / "external-values.yaml", False, False),
    ],
    ids=["defaults", "cpu", "gpu", "external"],
)
def test_store_and_database_are_bundled_only_when_asked(helm, values, minio, postgresql):
    objects = rendered(values)
    sets = {s["metadata"]["name"] for s in _kind(objects, "StatefulSet")}
    assert ("tailor-minio" in sets) == minio and ("tailor-postgresql" in sets) == postgresql
    secrets = {s["metadata"]["name"]: s for s in _kind(objects, "Secret")}
    assert ("tailor-minio" in secrets) == minio and ("tailor-postgresql" in secrets) == postgresql
    if minio:
        assert set(secrets["tailor-minio"]["data"]) == {"access-key", "secret-key"}
    gateway = next(d for d in _kind(objects, "Deployment") if d["metadata"]["name"] == "tailor-gateway")
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    s3_secret = env["TAILOR_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"]
    assert s3_secret == ("tailor-minio" if minio else "tailor-s3")
    assert env["TAILOR_S3_ENDPOINT_URL"]["value"] == (
        "http://tailor-minio:9000" if minio else "https://s3.eu-central-1.amazonaws.com"
    )
    claims = _kind(objects, "PersistentVolumeClaim")
    if postgresql:
        assert (
            env["TAILOR_STATE_URL"]["value"]
            == "postgresql://tailor:$(TAILOR_STATE_PASSWORD)@tailor-postgresql:5432/tailor"
        )
        assert list(env).index("TAILOR_STATE_PASSWORD") < list(env).index(
            "TAILOR_STATE_URL"
        )  # $(VAR) expansion
        assert not claims and "TAILOR_STATE_DB" not in env
    elif value_set_id(values) == "external-values.yaml":
        assert env["TAILOR_STATE_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "tailor-state-db",
            "key": "url",
        }
        assert not claims and "TAILOR_STATE_DB" not in env
    else:
        assert (
            env["TAILOR_STATE_DB"]["value"] == "/var/lib/tailor/gateway.db" and "TAILOR_STATE_URL" not in env
        )
        assert [c["metadata"]["name"] for c in claims] == ["tailor-gateway-state"]


@pytest.mark.parametrize(
    ("values", "repository", "gpus"),
    [
        (None, "s3://tailor-minio:9000/tailor/artifacts/triton", None),
        (CHART / "ci" / "gpu-values.yaml", "s3://tailor-minio:9000/tailor/artifacts/triton", 1),
        (
            CHART / "ci" / "external-values.yaml",
            "s3://https://s3.eu-central-1.amazonaws.com:443/tailor-prod/artifacts/triton",
            None,
        ),
    ],
    ids=["defaults", "gpu", "external"],
)
def test_triton_serves_the_store_with_http_probes(helm, values, repository, gpus):
    objects = rendered(values)
    triton = next(d for d in _kind(objects, "Deployment") if _component(d) == "triton")
    spec = triton["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["image"] == "nvcr.io/nvidia/tritonserver:24.08-py3"
    assert f"--model-repository={repository}" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    env = {e["name"]: e for e in container["env"]}
    secret = "tailor-s3" if values and "external" in values.name else "tailor-minio"
    for name, key in (("AWS_ACCESS_KEY_ID", "access-key"), ("AWS_SECRET_ACCESS_KEY", "secret-key")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}
    exit_timeout = int(
        next(a for a in container["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1]
    )
    assert spec["terminationGracePeriodSeconds"] > exit_timeout
    assert container["resources"]["limits"].get("nvidia.com/gpu") == gpus


def test_service_monitor_scrapes_every_metrics_port(helm):
    """monitoring.coreos.com/v1 has no schema in kubernetes-validate: its structure is checked here."""
    objects = rendered(CHART / "ci" / "gpu-values.yaml")
    (monitor,) = _kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert set(spec) == {"namespaceSelector", "selector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": ["tailor"]}
    assert spec["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    services = _kind(objects, "Service")
    scraped = {s["metadata"]["name"] for s in services if _selects(spec["selector"], s["metadata"]["labels"])}
    with_metrics = {
        s["metadata"]["name"] for s in services if "metrics" in {p["name"] for p in s["spec"]["ports"]}
    }
    assert scraped == with_metrics and "tailor-triton" in scraped
    assert not _kind(rendered(None), "ServiceMonitor"), (
        "off by default: it needs the Prometheus Operator's CRDs"
    )


def test_grafana_dashboard_charts_every_tailor_metric(helm):
    (config,) = [c for c in _kind(rendered(None), "ConfigMap") if c["metadata"]["name"] == "tailor-dashboard"]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config["data"]["tailor.json"])
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    for metric in METRICS:
        assert metric in exprs, metric
    assert "sum by (pool) (tailor_gateway_queue_depth" in exprs


@pytest.mark.parametrize(
    ("mode", "expected", "absent"),
    [
        ("explicit", ["--model-control-mode=explicit", "--load-model=*"], "--repository-poll-secs="),
        ("poll", ["--model-control-mode=poll", "--repository-poll-secs=30"], "--load-model=*"),
    ],
)
def test_triton_model_control_mode(helm, tmp_path, mode, expected, absent):
    """explicit (default): deploy/undeploy through the model-repository API; poll: Triton polls."""
    values = tmp_path / "values.yaml"
    values.write_text(f"tritonServer:\n  modelControlMode: {mode}\n")
    triton = next(d for d in _kind(rendered(values), "Deployment") if _component(d) == "triton")
    args = triton["spec"]["template"]["spec"]["containers"][0]["args"]
    assert all(a in args for a in expected), args
    assert not any(a.startswith(absent) for a in args), args
