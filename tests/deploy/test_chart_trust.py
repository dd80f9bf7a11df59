"""charts/tailor, trust between services: mutual TLS between the gateway and every worker by default (each
pod mounts the CA and its own certificate only; workers accept the gateway's name only), certificates from
cert-manager or from a chart-generated CA that upgrades keep, a shared secret when TLS is off. Rendered
offline; the generated certificates are checked with the openssl command."""

from __future__ import annotations

import base64
import subprocess

import pytest
import yaml
from deploy_support import CHART, KUBE_VERSION, VALUE_SETS, rendered, value_set_id

WORKERS = ("quantizer", "trainer", "benchmarker", "exporter", "selector")
value_sets = pytest.mark.parametrize("values", VALUE_SETS, ids=value_set_id)


def _render(helm: str, *sets: str) -> list[dict]:
    cmd = [helm, "template", "tailor", str(CHART), "--namespace", "tailor", "--kube-version", KUBE_VERSION]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _deployments(objects) -> dict[str, dict]:
    return {
        o["metadata"]["labels"]["app.kubernetes.io/component"] + ":" + o["metadata"]["name"]: o
        for o in objects
        if o["kind"] == "Deployment"
        # Triton runs NVIDIA's image; the web front is a client of the gateway, with no certificate
        # (test_chart_web.py checks that it mounts none)
        and o["metadata"]["labels"]["app.kubernetes.io/component"] not in ("triton", "web")
    }


def _env(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}


@value_sets
def test_every_worker_and_the_gateway_use_mutual_tls_by_default(helm, values):
    for key, deployment in _deployments(rendered(values)).items():
        component = key.split(":")[0]
        pod = deployment["spec"]["template"]["spec"]
        env = _env(pod)
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["internal-tls"]["mountPath"] == "/etc/tailor/tls" and mounts["internal-tls"]["readOnly"]
        volume = next(v for v in pod["volumes"] if v["name"] == "internal-tls")["secret"]
        items = {i["key"]: i["path"] for i in volume["items"]}
        # only the CA and its own certificate: a worker pod holds no key the workers would accept
        assert items == {"ca.crt": "ca.crt", f"{component}.crt": "tls.crt", f"{component}.key": "tls.key"}
        assert "TAILOR_WORKER_SECRET_FILE" not in env
        if component == "gateway":
            assert env["TAILOR_WORKER_TLS_CERT"] == "/etc/tailor/tls/tls.crt"
            assert env["TAILOR_WORKER_TLS_CA"] == "/etc/tailor/tls/ca.crt"
            assert env["TAILOR_WORKER_TLS_SERVER_NAME"] == "tailor-workers"
            assert "TAILOR_TLS_CA" not in env  # users reach the gateway as before
        else:
            assert env["TAILOR_TLS_CA"] == "/etc/tailor/tls/ca.crt"
            assert env["TAILOR_TLS_CERT"] == "/etc/tailor/tls/tls.crt"
            assert env["TAILOR_TLS_KEY"] == "/etc/tailor/tls/tls.key"
            assert env["TAILOR_GATEWAY_IDENTITIES"] == "tailor-gateway"
            assert env["TAILOR_HEALTH_PORT"] == "50100"
            assert "TAILOR_INSECURE_OPEN_WORKER" not in env


def _secret_certs(objects) -> dict[str, bytes]:
    secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "tailor-tls")
    return {
        k.removesuffix(".crt"): base64.b64decode(v) for k, v in secret["data"].items() if k.endswith(".crt")
    }


def _openssl(*args: str, stdin: bytes = b"") -> str:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=True).stdout.decode()


def test_the_chart_generated_certificates_name_each_component_and_share_one_ca(helm, tmp_path):
    certs = _secret_certs(rendered(None))
    assert set(certs) == {"ca", "gateway", *WORKERS}
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certs.pop("ca"))
    for name, pem in certs.items():
        (tmp_path / f"{name}.pem").write_bytes(pem)
        assert "OK" in _openssl("verify", "-CAfile", str(ca), str(tmp_path / f"{name}.pem"))
        text = _openssl("x509", "-noout", "-text", stdin=pem)
        names = {
            n.strip().removeprefix("DNS:")
            for n in text.split("Subject Alternative Name:")[1].splitlines()[1].split(",")
        }
        assert f"tailor-{name}" in names and f"tailor-{name}.tailor.svc" in names
        # every worker answers to the shared name the gateway verifies; the gateway's name is its own alone
        assert ("tailor-workers" in names) == (name != "gateway")
        assert ("tailor-gateway" in names) == (name == "gateway")


def test_tls_from_cert_manager_issues_one_certificate_per_component(helm):
    objects = _render(helm, "tls.certManager.enabled=true")
    assert not [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "tailor-tls"]
    certificates = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Certificate"}
    assert set(certificates) == {"tailor-ca", "tailor-gateway-tls", *(f"tailor-{w}-tls" for w in WORKERS)}
    assert certificates["tailor-ca"]["spec"]["isCA"] is True
    for w in WORKERS:
        spec = certificates[f"tailor-{w}-tls"]["spec"]
        assert spec["issuerRef"]["name"] == "tailor-ca" and "tailor-workers" in spec["dnsNames"]
        assert {"server auth", "client auth"} <= set(spec["usages"])
    for key, deployment in _deployments(objects).items():
        volume = next(
            v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "internal-tls"
        )
        assert volume["secret"]["secretName"] == f"tailor-{key.split(':')[0]}-tls"
    external = _render(
        helm,
        "tls.certManager.enabled=true,tls.certManager.issuerRef.name=corp,tls.certManager.issuerRef.kind=ClusterIssuer",
    )
    assert not [o for o in external if o["kind"] == "Issuer"]
    assert {o["spec"]["issuerRef"]["name"] for o in external if o["kind"] == "Certificate"} == {"corp"}


def test_without_tls_every_pod_gets_the_shared_secret(helm):
    objects = _render(helm, "tls.enabled=false")
    secret = next(
        o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "tailor-worker-secret"
    )
    assert len(base64.b64decode(secret["data"]["secret"])) == 48
    for deployment in _deployments(objects).values():
        pod = deployment["spec"]["template"]["spec"]
        assert _env(pod)["TAILOR_WORKER_SECRET_FILE"] == "/etc/tailor/worker-secret/secret"
        assert (
            next(v for v in pod["volumes"] if v["name"] == "worker-secret")["secret"]["secretName"]
            == "tailor-worker-secret"
        )
        assert "TAILOR_TLS_CA" not in _env(pod)


def test_an_upgrade_keeps_the_ca(helm):
    """genCA runs only when lookup finds no Secret: the chart reads ca.crt/ca.key back (buildCustomCert)."""
    template = (CHART / "templates" / "internal-tls.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $secretName' in template
    assert "buildCustomCert" in template
    first, second = _secret_certs(rendered(None)), _secret_certs(_render(helm))
    assert first["ca"] != second["ca"]  # offline (no cluster to look up) each render is a fresh CA ...
    # ... which is why k8s/ names an existing Secret instead (tools/render_k8s.py).
    k8s = (CHART.parents[1] / "k8s" / "base" / "tailor.yaml").read_text()
    assert "secretName: tailor-tls" in k8s and "BEGIN CERTIFICATE" not in k8s and "ca.key:" not in k8s
