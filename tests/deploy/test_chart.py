"""charts/tailor: lint, render every value set, validate every object against Kubernetes 1.32 (strict),
hold every pod to the same policy, and reject wrong values with a message that names the value."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from deploy_support import CHART, COMPONENTS, KUBE_VERSION, VALUE_SETS, rendered, value_set_id

GPU = "nvidia.com/gpu"
# Which Deployments (one per pool) must run on GPU nodes under each value set.
GPU_POOLS = {
    "defaults": {"tailor-trainer", "tailor-quantizer", "tailor-benchmarker"},
    "gpu-values.yaml": {
        "tailor-trainer",
        "tailor-quantizer-gpu",
        "tailor-benchmarker-l4",
        "tailor-benchmarker-h100",
        "tailor-triton",
    },
    "cpu-values.yaml": set(),
    "minimal-values.yaml": set(),
    "external-values.yaml": set(),
}
# Kinds of the Prometheus Operator: kubernetes-validate has no schema for CRDs, so only these are skipped
# there and checked by test_service_monitor_scrapes_every_metrics_port instead.
CRD_KINDS = {"ServiceMonitor"}
TAILOR_SERVICES = COMPONENTS  # Tailor's own images (gRPC health); Triton, MinIO, PostgreSQL are not
value_sets = pytest.mark.parametrize("values", VALUE_SETS, ids=value_set_id)


def _template(helm: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [helm, "template", "tailor", str(CHART), "--namespace", "tailor", "--kube-version", KUBE_VERSION]
    return subprocess.run([*cmd, *args], capture_output=True, text=True)


def _pod_specs(objects) -> list[tuple[str, dict]]:
    specs = []
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            specs.append((obj["metadata"]["name"], obj["spec"]["template"]["spec"]))
        elif obj["kind"] == "Pod":
            specs.append((obj["metadata"]["name"], obj["spec"]))
    return specs


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _component(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def _kind(objects, kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions with In) against a label set."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_every_value_set_is_checked():
    assert {value_set_id(v) for v in VALUE_SETS} == set(GPU_POOLS)


@value_sets
def test_helm_lint_strict(helm, values):
    args = ["--values", str(values)] if values else []
    done = subprocess.run([helm, "lint", str(CHART), "--strict", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@value_sets
@pytest.mark.slow
def test_every_object_is_valid_kubernetes_1_32(helm, values):
    objects = rendered(values)
    assert objects
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")


@value_sets
def test_every_container_is_hardened_and_sized(helm, values):
    for name, spec in _pod_specs(rendered(values)):
        pod_security = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is not None, f"{name}: say whether a token is mounted"
        for container in spec["containers"]:
            where = f"{name}/{container['name']}"
            security = container.get("securityContext", {})
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: requests"
            assert "memory" in resources.get("limits", {}), f"{where}: memory limit"


@value_sets
def test_every_service_container_has_grpc_probes_and_a_grace_period(helm, values):
    for obj in rendered(values):
        if obj["kind"] != "Deployment" or _component(obj) not in TAILOR_SERVICES:
            continue
        spec = obj["spec"]["template"]["spec"]
        for container in spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                # Workers behind mutual TLS answer probes on their plaintext health port (kubelet cannot do TLS).
                expected = ports.get("health", ports["grpc"])
                assert container[probe]["grpc"]["port"] == expected, f"{obj['metadata']['name']} {probe}"
            grace = float(_env(container)["TAILOR_GRACE_SECONDS"])
            assert spec["terminationGracePeriodSeconds"] > grace, "SIGKILL must come after the graceful stop"
            assert _env(container)["TAILOR_METRICS_PORT"] == str(ports["metrics"])


@value_sets
def test_gpu_pools_request_gpus_and_tolerate_the_gpu_taint(helm, values):
    gpu_pools = set()
    for obj in rendered(values):
        if obj["kind"] != "Deployment":
            continue
        component = obj["metadata"]["name"]
        spec = obj["spec"]["template"]["spec"]
        resources = spec["containers"][0]["resources"]
        requested = resources.get("requests", {}).get(GPU)
        limited = resources.get("limits", {}).get(GPU)
        tolerates = any(
            t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in spec.get("tolerations", [])
        )
        if requested or limited:
            gpu_pools.add(component)
            assert requested == limited and int(requested) >= 1, (
                f"{component}: GPU requests must equal limits"
            )
            assert tolerates, f"{component}: GPU pods must tolerate the {GPU} taint"
        else:
            assert not tolerates, f"{component}: a CPU pod has no business on tainted GPU nodes"
    assert gpu_pools == GPU_POOLS[value_set_id(values)]


@value_sets
def test_gpu_pods_get_a_memory_backed_dev_shm_and_cpu_pods_none(helm, values):
    """NCCL between the data-parallel ranks of a trainer pod needs more /dev/shm than a container's default."""
    for obj in rendered(values):
        if obj["kind"] != "Deployment" or _component(obj) not in TAILOR_SERVICES:
            continue
        spec = obj["spec"]["template"]["spec"]
        container = spec["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        name = obj["metadata"]["name"]
        if container["resources"].get("limits", {}).get(GPU):
            assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}, name
        else:
            assert "/dev/shm" not in mounts, f"{name}: a CPU pod needs no memory-backed /dev/shm"


@value_sets
def test_services_select_every_pool_of_their_component_on_the_same_ports(helm, values):
    objects = rendered(values)
    workloads = _kind(objects, "Deployment") + _kind(objects, "StatefulSet")
    services = _kind(objects, "Service")
    assert {_component(s) for s in services} == {_component(w) for w in workloads}
    for service in services:
        selected = [
            w
            for w in workloads
            if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        # every pool (Deployment) of the component, and nothing else
        assert selected == [w for w in workloads if _component(w) == _component(service)], service[
            "metadata"
        ]["name"]
        assert "tailor.dev/pool" not in service["spec"]["selector"]
        for workload in selected:
            pod = workload["spec"]["template"]
            container_ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
            assert {p["targetPort"] for p in service["spec"]["ports"]} == container_ports


@value_sets
def test_pool_deployments_do_not_overlap(helm, values):
    deployments = _kind(rendered(values), "Deployment")
    for a in deployments:
        selector = a["spec"]["selector"]
        assert _selects(selector, a["spec"]["template"]["metadata"]["labels"])
        for b in deployments:
            if b is not a:
                assert not _selects(selector, b["spec"]["template"]["metadata"]["labels"]), (
                    f"{a['metadata']['name']} would adopt the pods of {b['metadata']['name']}"
                )


def test_separate_pools_come_from_values_alone(helm):
    objects = rendered(CHART / "ci" / "gpu-values.yaml")
    quantizers = {
        d["metadata"]["name"]: d for d in _kind(objects, "Deployment") if _component(d) == "quantizer"
    }
    assert set(quantizers) == {"tailor-quantizer-cpu", "tailor-quantizer-gpu"}
    cpu = quantizers["tailor-quantizer-cpu"]
    assert cpu["spec"]["replicas"] == 2 and "nodeSelector" not in cpu["spec"]["template"]["spec"]
    assert GPU not in cpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpu = quantizers["tailor-quantizer-gpu"]["spec"]["template"]["spec"]
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    h100 = next(d for d in _kind(objects, "Deployment") if d["metadata"]["name"] == "tailor-benchmarker-h100")
    env = _env(h100["spec"]["template"]["spec"]["containers"][0])
    assert (
        env["TAILOR_LOG_LEVEL"] == "INFO" and env["TAILOR_MAX_OPERATIONS"] == "1"
    )  # pool env over component env


@value_sets
def test_gateway_finds_the_enabled_pools(helm, values):
    objects = rendered(values)
    gateway = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "tailor-gateway"
    )
    spec = gateway["spec"]["template"]["spec"]
    env = _env(spec["containers"][0])
    enabled = {_component(o) for o in objects if o["kind"] == "Service"}
    enabled -= {"gateway", "triton", "minio", "postgresql", "web"}  # web: a client of the gateway
    if env["TAILOR_DISCOVERY"] == "static":
        pools = dict(part.split("=") for part in env["TAILOR_WORKERS"].split(";"))
        assert set(pools) == enabled
        assert spec["automountServiceAccountToken"] is False
        assert not [o for o in objects if o["kind"] in ("Role", "RoleBinding", "ServiceAccount")]
        return
    assert env["TAILOR_DISCOVERY"] == "kubernetes"
    assert (
        env["TAILOR_DISCOVERY_SELECTOR"] == "app.kubernetes.io/name=tailor,app.kubernetes.io/instance=tailor"
    )
    for service in (o for o in objects if o["kind"] == "Service"):
        labels = service["metadata"]["labels"]  # copied onto the EndpointSlices by the controller
        assert (
            labels["app.kubernetes.io/name"] == "tailor" and labels["app.kubernetes.io/instance"] == "tailor"
        )
    role = next(o for o in objects if o["kind"] == "Role")
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == spec["serviceAccountName"]
    assert spec["automountServiceAccountToken"] is True
    others = [o for o in objects if o["kind"] == "Deployment" and o is not gateway]
    assert all(o["spec"]["template"]["spec"]["automountServiceAccountToken"] is False for o in others)


@value_sets
def test_autoscalers_scale_existing_deployments_on_their_own_queue(helm, values):
    objects = rendered(values)
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "the HPA owns the replica count"
        component = _component(target)
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "External":
                assert metric["external"]["metric"]["name"] == "tailor_gateway_queue_depth"
                assert metric["external"]["metric"]["selector"]["matchLabels"] == {"pool": component}


def test_gpu_profile_scales_gpu_pools_on_queue_depth(helm):
    objects = rendered(CHART / "ci" / "gpu-values.yaml")
    scaled = {o["spec"]["scaleTargetRef"]["name"] for o in objects if o["kind"] == "HorizontalPodAutoscaler"}
    assert scaled == {"tailor-quantizer-gpu", "tailor-benchmarker-l4", "tailor-benchmarker-h100"}
    for hpa in _kind(objects, "HorizontalPodAutoscaler"):
        assert any(m["type"] == "External" for m in hpa["spec"]["metrics"]), hpa["metadata"]["name"]


def test_gateway_state_survives_restarts_and_uninstall(helm):
    objects = rendered(None)
    claim = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    gateway = next(
        o for o in objects if o["metadata"]["name"] == "tailor-gateway" and o["kind"] == "Deployment"
    )
    assert gateway["spec"]["replicas"] == 1 and gateway["spec"]["strategy"]["type"] == "Recreate"
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert volumes["auth"]["secret"]["secretName"] == "tailor-tokens"


def test_helm_test_hook_checks_every_enabled_component(helm):
    pod = next(o for o in rendered(None) if o["kind"] == "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    targets = pod["spec"]["containers"][0]["args"][1:]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert targets == [
        *(
            f"grpc=tailor-{c}:{values[c]['port'] if c == 'gateway' else values['tls']['healthPort']}"
            for c in COMPONENTS
        ),
        f"http=http://tailor-web:{values['web']['port']}/healthz",
        "http=http://tailor-triton:8000/v2/health/ready",
        "http=http://tailor-minio:9000/minio/health/ready",
    ]
    gpu = next(o for o in rendered(CHART / "ci" / "gpu-values.yaml") if o["kind"] == "Pod")
    assert "tcp=tailor-postgresql:5432" in gpu["spec"]["containers"][0]["args"]


BAD_VALUES = [
    ("quantizer.gpu.count=two", "quantizer.gpu.count: Invalid type. Expected: integer, given: string"),
    ("trainer.gpus.count=1", "trainer: Additional property gpus is not allowed"),
    ("store.url=http://minio:9000/bucket", "store.url: Does not match pattern"),
    ("discovery.mode=dns", 'discovery.mode must be one of the following: "kubernetes", "static"'),
    ("gateway.port=70000", "gateway.port: Must be less than or equal to 65535"),
    (
        "quantizer.resources.requests.memory=lots",
        "quantizer.resources.requests.memory: Does not match pattern",
    ),
    (
        "securityContext.readOnlyRootFilesystem=false",
        "securityContext.readOnlyRootFilesystem does not match: true",
    ),
    ("podSecurityContext.runAsNonRoot=false", "podSecurityContext.runAsNonRoot does not match: true"),
    (
        "gpuNodes.tolerations[0].effect=Sometimes",
        "gpuNodes.tolerations.0.effect must be one of the following",
    ),
    ("gpuNodes.shmSizeLimit=lots", "gpuNodes.shmSizeLimit: Does not match pattern"),
    (
        "gateway.replicaCount=2",
        "the durable state is one SQLite file with one writer; set gateway.replicaCount=1",
    ),
    ("gateway.enabled=false", "the gateway is the only entry point"),
    ("gateway.pools[0].name=a", "gateway.pools: the gateway is one pod"),
    ("quantizer.pools[0].name=GPU", "quantizer.pools.0.name: Does not match pattern"),
    (
        "quantizer.pools[0].name=a,quantizer.pools[1].name=a",
        'quantizer.pools: the pool name "a" is used twice',
    ),
    ("quantizer.pools[0].gpus=1", "quantizer.pools.0: Additional property gpus is not allowed"),
    ("store.minio.enabled=false", "store.minio.enabled=false: set store.external.existingSecret"),
    ("store.external.endpoint=s3.example.com", "store.external.endpoint: Does not match pattern"),
    (
        "gatewayState.postgresql.enabled=true,gatewayState.external.urlSecret=db",
        "choose the bundled PostgreSQL or the external database",
    ),
    ("networkPolicy.enabled=yes", "networkPolicy.enabled: Invalid type. Expected: boolean"),
    (
        "podDisruptionBudget.maxUnavailable=0",
        "podDisruptionBudget.maxUnavailable: Must be greater than or equal to 1",
    ),
    ("tritonServer.extraArgs[0]=log-verbose", "tritonServer.extraArgs.0: Does not match pattern"),
    (
        "quantizer.autoscaling.enabled=true,quantizer.autoscaling.minReplicas=5,quantizer.autoscaling.maxReplicas=2",
        "quantizer.autoscaling: minReplicas (5) is greater than maxReplicas (2)",
    ),
]


@pytest.mark.parametrize(("setting", "message"), BAD_VALUES, ids=[b[0].split("=")[0] for b in BAD_VALUES])
def test_wrong_values_fail_with_a_message_naming_them(helm, setting, message):
    done = _template(helm, "--set", setting)
    assert done.returncode != 0, f"--set {setting} rendered"
    assert message in done.stderr, done.stderr


def test_values_file_with_a_typo_fails(helm, tmp_path: Path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("quantizer:\n  nodeSelecter: {gpu: l4}\n")
    done = _template(helm, "--values", str(bad))
    assert (
        done.returncode != 0 and "quantizer: Additional property nodeSelecter is not allowed" in done.stderr
    )
