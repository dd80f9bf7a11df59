"""charts/tailor, the web front (docs/web.md, "Kubernetes"): `python -m tailor_web` in the gateway's image, a
client of the gateway's Service; HTTP probes on a route the app really serves; an optional Ingress; a
NetworkPolicy that lets it reach the gateway and DNS only, while the gateway's admits it. Rendered offline
(helm template) and validated against Kubernetes 1.32; the policies are checked by evaluating their selectors
against the rendered pods' labels, not by a CNI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from deploy_support import CHART, KUBE_VERSION, VALUE_SETS, rendered, value_set_id

value_sets = pytest.mark.parametrize("values", VALUE_SETS, ids=value_set_id)
EXTERNAL = CHART / "ci" / "external-values.yaml"  # web.ingress on, networkPolicy.webFrom set
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def _template(helm: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [helm, "template", "tailor", str(CHART), "--namespace", "tailor", "--kube-version", KUBE_VERSION]
    return subprocess.run([*cmd, *args], capture_output=True, text=True)


def _render(helm: str, *args: str) -> list[dict]:
    done = _template(helm, *args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def _of(objects, kind: str, component: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and _component(o) == component]


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))


def _pod_labels(objects) -> dict[str, dict]:
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    return {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads}


def _policy_of(objects, labels: dict) -> dict:
    (policy,) = [
        p for p in objects if p["kind"] == "NetworkPolicy" and _selects(p["spec"]["podSelector"], labels)
    ]
    return policy


def _web(objects) -> tuple[dict, dict]:
    (deployment,) = _of(objects, "Deployment", "web")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


@value_sets
def test_the_web_front_runs_tailor_web_against_the_gateway_service(helm, values):
    objects = rendered(values)
    spec, container = _web(objects)
    assert container["command"] == ["python", "-m", "tailor_web"]
    (gateway,) = _of(objects, "Deployment", "gateway")
    # the gateway's image, which holds tailor_web and its pins (issue 16: one image, another command)
    assert container["image"] == gateway["spec"]["template"]["spec"]["containers"][0]["image"]
    env = {e["name"]: e for e in container["env"]}
    assert all("valueFrom" not in e for e in env.values()), "the web front holds no secret"
    (service,) = _of(objects, "Service", "gateway")
    grpc = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert env["TAILOR_GATEWAY"]["value"] == f"{service['metadata']['name']}:{grpc}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": VALUES["web"]["port"]}
    assert env["TAILOR_WEB_PORT"]["value"] == str(ports["http"])
    assert env["TAILOR_WEB_HOST"]["value"] == "0.0.0.0"  # tailor_web listens on 127.0.0.1 otherwise
    # a client like the CLI: no certificate, no worker secret, no service account token, nothing but /tmp
    assert spec["automountServiceAccountToken"] is False
    assert [v for v in spec["volumes"] if set(v) != {"name", "emptyDir"}] == []
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    assert not any(k.startswith("TAILOR_TLS") or k.startswith("TAILOR_WORKER") for k in env)
    assert spec["terminationGracePeriodSeconds"] > 10  # uvicorn's timeout_graceful_shutdown


def test_the_gateway_serves_its_users_without_tls_so_the_web_front_needs_none(helm):
    """If the chart ever gives the gateway TAILOR_TLS_* (TLS to its users), the web pod needs the CA too."""
    (gateway,) = _of(rendered(None), "Deployment", "gateway")
    env = {e["name"] for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "TAILOR_WORKER_TLS_CERT" in env and not env & {
        "TAILOR_TLS_CA",
        "TAILOR_TLS_CERT",
        "TAILOR_TLS_KEY",
    }


def test_probes_ask_a_route_the_web_app_serves():
    from fastapi.testclient import TestClient  # noqa: PLC0415 - the web extra, only here

    from tailor_web.__main__ import DEFAULT_PORT  # noqa: PLC0415
    from tailor_web.app import create_app  # noqa: PLC0415

    assert VALUES["web"]["port"] == DEFAULT_PORT
    _, container = _web(rendered(None))
    paths = set()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http", probe
        paths.add(container[probe]["httpGet"]["path"])
    (path,) = paths
    # the app itself (no gateway needed: /healthz is this process's own health)
    response = TestClient(create_app(None)).get(path)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_the_rendered_command_and_env_start_a_process_that_answers_the_probe(tmp_path):
    """The container's command and environment as the chart renders them, run here (its port swapped for a
    free one): it listens and answers the readiness probe with no gateway reachable (the channel is lazy)."""
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    from support.ports import free_port  # noqa: PLC0415

    _, container = _web(rendered(None))
    assert container["command"][0] == "python"
    port = free_port()
    env = {e["name"]: e["value"] for e in container["env"]}
    env |= {"TAILOR_WEB_PORT": str(port), "HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")}
    probe = container["readinessProbe"]["httpGet"]
    log = tmp_path / "web.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, *container["command"][1:]], env=env, stdout=out, stderr=out)
    try:
        status = None
        deadline = time.monotonic() + 60  # how long to wait for it to listen, not a claim about speed
        while status is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe['path']}", timeout=5) as response:
                    status = response.status
            except urllib.error.HTTPError as exc:  # it answered, with an error status
                status = exc.code
            except OSError:  # not listening yet
                time.sleep(0.2)
        assert status == 200, f"no answer on {probe['path']} (exit code {proc.poll()}):\n{log.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@value_sets
def test_the_web_service_selects_the_web_pods_on_their_http_port(helm, values):
    objects = rendered(values)
    (service,) = _of(objects, "Service", "web")
    pods = _pod_labels(objects)
    selected = {n for n, labels in pods.items() if service["spec"]["selector"].items() <= labels.items()}
    assert selected == {d["metadata"]["name"] for d in _of(objects, "Deployment", "web")}
    assert service["spec"]["ports"] == [
        {"name": "http", "port": VALUES["web"]["port"], "targetPort": "http", "appProtocol": "http"}
    ]


def test_no_ingress_by_default(helm):
    assert not [o for o in rendered(None) if o["kind"] == "Ingress"]


def test_the_ingress_routes_every_path_of_its_hosts_to_the_web_service(helm):
    objects = rendered(EXTERNAL)
    (ingress,) = [o for o in objects if o["kind"] == "Ingress"]
    (service,) = _of(objects, "Service", "web")
    configured = yaml.safe_load(EXTERNAL.read_text())["web"]["ingress"]
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == configured["tls"]
    assert ingress["metadata"]["annotations"] == configured["annotations"]
    assert [r["host"] for r in spec["rules"]] == ["tailor.example.com"]
    for rule in spec["rules"]:
        (path,) = rule["http"]["paths"]
        assert path["path"] == "/" and path["pathType"] == "Prefix"
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert _component(ingress) == "web"


def test_an_ingress_without_hosts_serves_every_host_and_is_valid(helm):
    objects = _render(helm, "--set", "web.ingress.enabled=true")
    (ingress,) = [o for o in objects if o["kind"] == "Ingress"]
    assert "ingressClassName" not in ingress["spec"] and "tls" not in ingress["spec"]
    (rule,) = ingress["spec"]["rules"]
    assert "host" not in rule
    kubernetes_validate.validate(ingress, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    "settings",
    [
        ["--set", "web.ingress.enabled=true"],
        ["--values", str(EXTERNAL)],
        ["--set", "web.autoscaling.enabled=true,web.pools[0].name=a,web.pools[1].name=b"],
    ],
    ids=["ingress", "external", "pools+hpa"],
)
def test_web_objects_are_valid_kubernetes_1_32_and_lint(helm, settings):
    objects = _render(helm, *settings)
    web = [o for o in objects if _component(o) == "web"]
    assert {o["kind"] for o in web} >= {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"}
    for obj in web:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    done = subprocess.run([helm, "lint", str(CHART), "--strict", *settings], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_web_pools_and_autoscaling_follow_the_other_components(helm):
    objects = _render(helm, "--set", "web.autoscaling.enabled=true,web.pools[0].name=a,web.pools[1].name=b")
    deployments = {d["metadata"]["name"]: d for d in _of(objects, "Deployment", "web")}
    assert set(deployments) == {"tailor-web-a", "tailor-web-b"}
    assert all("replicas" not in d["spec"] for d in deployments.values()), "the HPA owns the replica count"
    hpas = _of(objects, "HorizontalPodAutoscaler", "web")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == set(deployments)
    for hpa in hpas:
        assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]  # CPU: no queue of its own
    budgets = _of(objects, "PodDisruptionBudget", "web")
    assert {b["metadata"]["name"] for b in budgets} == set(deployments)


@value_sets
def test_web_pods_may_reach_the_gateway_and_dns_only(helm, values):
    objects = rendered(values)
    if not [o for o in objects if o["kind"] == "NetworkPolicy"]:
        assert value_set_id(values) == "minimal-values.yaml"  # networkPolicy.enabled=false there
        return
    pods = _pod_labels(objects)
    web_pods = [labels for labels in pods.values() if labels["app.kubernetes.io/component"] == "web"]
    assert web_pods
    policy = _policy_of(objects, web_pods[0])
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    gateway_port = VALUES["gateway"]["port"]
    egress = policy["spec"]["egress"]
    assert len(egress) == 2
    to_gateway, dns = egress
    assert to_gateway["ports"] == [{"port": gateway_port, "protocol": "TCP"}]
    reached = {
        n for n, labels in pods.items() if any(_selects(p["podSelector"], labels) for p in to_gateway["to"])
    }
    gateway_pods = {n for n, labels in pods.items() if labels["app.kubernetes.io/component"] == "gateway"}
    assert reached == gateway_pods and all(set(p) == {"podSelector"} for p in to_gateway["to"])
    # the gateway container listens on that port (egress is checked against the pod's port, not the Service's)
    (gateway,) = _of(objects, "Deployment", "gateway")
    grpc = next(
        p for p in gateway["spec"]["template"]["spec"]["containers"][0]["ports"] if p["name"] == "grpc"
    )
    assert grpc["containerPort"] == gateway_port
    assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert dns["to"] == VALUES["networkPolicy"]["dnsTo"]
    # DNS is in another namespace (kube-system by default): port 53 opens no pod of this release
    assert dns["to"] and all("namespaceSelector" in peer for peer in dns["to"])
    # ... and the gateway's policy lets the web pods in on its gRPC port, whatever gatewayFrom says
    gateway_policy = _policy_of(objects, pods["tailor-gateway"])
    admitted = [
        r
        for r in gateway_policy["spec"]["ingress"]
        if {"port": "grpc", "protocol": "TCP"} in r["ports"]
        and any(
            "namespaceSelector" not in p and all(_selects(p["podSelector"], w) for w in web_pods)
            for p in r.get("from", [])
        )
    ]
    assert admitted, "the gateway's NetworkPolicy must admit the web pods"


def test_web_from_restricts_who_reaches_the_web_pods(helm):
    objects = rendered(EXTERNAL)
    pods = _pod_labels(objects)
    policy = _policy_of(objects, pods["tailor-web"])
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    configured = yaml.safe_load(EXTERNAL.read_text())["networkPolicy"]["webFrom"]
    namespaces = [p for p in rule["from"] if "namespaceSelector" in p]
    assert namespaces == configured  # the Ingress controller's namespace
    in_namespace = [p["podSelector"] for p in rule["from"] if "namespaceSelector" not in p]
    hook = {
        "app.kubernetes.io/name": "tailor",
        "app.kubernetes.io/instance": "tailor",
        "tailor.dev/helm-test-hook": "true",
    }
    assert all(_selects(s, hook) for s in in_namespace) and in_namespace, "only the `helm test` pod of ours"
    assert not any(_selects(s, labels) for s in in_namespace for labels in pods.values())


def test_without_the_web_front_nothing_of_it_is_rendered(helm):
    objects = _render(helm, "--set", "web.enabled=false,web.ingress.enabled=true")
    assert not [o for o in objects if _component(o) == "web"]
    assert not [o for o in objects if o["kind"] == "Ingress"]
    # the gateway's policy admits no web pods, and `helm test` does not ask for them
    assert '"web"' not in json.dumps([o for o in objects if o["kind"] == "NetworkPolicy"])
    done = _template(helm, "--set", "web.enabled=false")
    (hook,) = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "Pod"]
    assert not [a for a in hook["spec"]["containers"][0]["args"] if "tailor-web" in a]


def test_network_policies_off_means_no_web_policy(helm):
    objects = _render(helm, "--set", "networkPolicy.enabled=false")
    assert not [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert _of(objects, "Deployment", "web")


def test_values_block_is_the_component_block_plus_ingress():
    schema = json.loads((CHART / "values.schema.json").read_text())
    component = schema["definitions"]["component"]
    web = schema["definitions"]["web"]
    assert schema["properties"]["web"] == {"$ref": "#/definitions/web"} and "web" in schema["required"]
    assert set(VALUES["web"]) == set(VALUES["gateway"]) | {"ingress"}
    assert set(web["required"]) == set(VALUES["web"]) and web["additionalProperties"] is False
    for key in component["properties"]:  # the same definitions, not copies that could drift
        assert web["properties"][key] == {"$ref": f"#/definitions/component/properties/{key}"}
    ingress = web["properties"]["ingress"]
    assert (
        set(ingress["required"]) == set(VALUES["web"]["ingress"]) and ingress["additionalProperties"] is False
    )


BAD_WEB_VALUES = [
    ("web.replicas=2", "web: Additional property replicas is not allowed"),
    ("web.port=0", "web.port: Must be greater than or equal to 1"),
    ("web.resources.requests.memory=lots", "web.resources.requests.memory: Does not match pattern"),
    ("web.enabled=yes", "web.enabled: Invalid type. Expected: boolean"),
    ("web.ingress.enabled=yes", "web.ingress.enabled: Invalid type. Expected: boolean"),
    ("web.ingress.host=tailor.example.com", "web.ingress: Additional property host is not allowed"),
    ("web.ingress.hosts[0]=https://tailor.example.com", "web.ingress.hosts.0: Does not match pattern"),
    ("web.ingress.hosts[0]=Tailor.Example.com", "web.ingress.hosts.0: Does not match pattern"),
    ("web.ingress.className=Nginx_Class", "web.ingress.className: Does not match pattern"),
    ("web.ingress.tls[0].secretName=web-tls", "web.ingress.tls.0: hosts is required"),
    ("web.ingress.tls[0].hosts[0]=a.example.com", "web.ingress.tls.0: secretName is required"),
    ("web.ingress.annotations.a=1", "web.ingress.annotations.a: Invalid type. Expected: string"),
    ("networkPolicy.webFrom=ingress", "networkPolicy.webFrom: Invalid type. Expected: array"),
    ("networkPolicy.dnsTo=kube-dns", "networkPolicy.dnsTo: Invalid type. Expected: array"),
    ("web.gpu.count=1", "web: the web front needs no GPU"),
    ("web.pools[0].name=a,web.pools[0].gpu.count=1", "web: the web front needs no GPU"),
    (
        "web.autoscaling.enabled=true,web.autoscaling.minReplicas=4,web.autoscaling.maxReplicas=2",
        "web.autoscaling: minReplicas (4) is greater than maxReplicas (2)",
    ),
    ("web.pools[0].name=a,web.pools[1].name=a", 'web.pools: the pool name "a" is used twice'),
]


@pytest.mark.parametrize(("setting", "message"), BAD_WEB_VALUES, ids=[b[0] for b in BAD_WEB_VALUES])
def test_wrong_web_values_fail_with_a_message_naming_them(helm, setting, message):
    done = _template(helm, "--set", setting)
    assert done.returncode != 0, f"--set {setting} rendered"
    assert message in done.stderr, done.stderr


def test_a_values_file_with_a_web_typo_fails(helm, tmp_path: Path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("web:\n  ingress:\n    enabled: true\n    hostnames: [tailor.example.com]\n")
    done = _template(helm, "--values", str(bad))
    assert done.returncode != 0 and "web.ingress: Additional property hostnames is not allowed" in done.stderr


def test_empty_dns_to_opens_port_53_anywhere_and_nothing_more(helm, tmp_path: Path):
    values = tmp_path / "dns.yaml"
    values.write_text("networkPolicy:\n  dnsTo: []\n")
    objects = _render(helm, "--values", str(values))
    (policy,) = _of(objects, "NetworkPolicy", "web")
    to_gateway, dns = policy["spec"]["egress"]
    assert "to" not in dns and {p["port"] for p in dns["ports"]} == {53}
    assert to_gateway["to"] and to_gateway["ports"] == [
        {"port": VALUES["gateway"]["port"], "protocol": "TCP"}
    ]
    kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
