"""The deployment files, checked offline: no Kubernetes API, helm or skaffold runs in the tests.

`helm lint`, `helm template` (helm 3.6.2 from npm) and `kubernetes-validate --strict` were run on the chart
by hand; these tests keep the files consistent with each other and with the services.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "tailor"
COMPONENTS = ("gateway", "quantizer", "trainer", "benchmarker", "exporter", "selector")
DOCKERFILES = {
    "gateway": REPO / "gateway" / "Dockerfile",
    **{c: REPO / "services" / c / "Dockerfile" for c in COMPONENTS if c != "gateway"},
}
WITHOUT_TORCH = ("gateway", "selector")


def _values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _shape(value) -> object:
    """Keys all the way down, values ignored: two blocks with the same shape compare equal."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items() if k not in ("requests", "limits")}
    return None


def test_every_component_has_the_same_values_block():
    values = _values()
    shapes = {c: _shape(values[c]) for c in COMPONENTS}
    assert all(shape == shapes["gateway"] for shape in shapes.values()), shapes
    expected = {"enabled", "replicaCount", "image", "port", "resources", "gpu", "nodeSelector"}
    expected |= {"tolerations", "affinity", "env", "autoscaling"}
    assert set(values["gateway"]) == expected


def test_schema_requires_exactly_the_block_and_names_every_component():
    schema = json.loads((CHART / "values.schema.json").read_text())
    component = schema["definitions"]["component"]
    assert set(component["required"]) == set(_values()["gateway"])
    assert component["additionalProperties"] is False
    for name in COMPONENTS:
        assert schema["properties"][name] == {"$ref": "#/definitions/component"}


@pytest.mark.parametrize("values_file", sorted((CHART / "ci").glob("*.yaml")), ids=lambda p: p.name)
def test_ci_value_files_only_set_known_keys(values_file):
    known = _values()

    def check(override, base, where):
        for key, value in override.items():
            assert key in base, f"{values_file.name}: unknown key {where}{key}"
            if isinstance(value, dict) and isinstance(base[key], dict) and base[key]:
                check(value, base[key], f"{where}{key}.")

    check(yaml.safe_load(values_file.read_text()), known, "")


def test_ports_match_the_services_defaults():
    values = _values()
    for name in COMPONENTS:
        package = "gateway/tailor_gateway" if name == "gateway" else f"services/{name}/tailor_{name}"
        main = (REPO / package / "__main__.py").read_text()
        assert f"port={values[name]['port']}" in main, f"{name}: chart port differs from __main__.py"


@pytest.mark.parametrize("name", COMPONENTS)
def test_dockerfile_is_slim_non_root_and_pinned(name):
    text = DOCKERFILES[name].read_text()
    assert "python:3.11-slim" in text
    assert re.search(r"^USER 10001", text, re.M), "the image must not run as root"
    assert "-r /tmp/requirements.txt" in text and "requirements.txt" in text  # pins from the one file
    assert f'CMD ["python", "-m", "tailor_{name}"]' in text
    assert f"TAILOR_PORT={_values()[name]['port']}" in text
    if name in WITHOUT_TORCH:
        assert "torch|transformers" in text, f"{name} must not install torch"
        assert "TORCH_INDEX" not in text


def test_skaffold_builds_one_image_per_service_and_deploys_the_chart():
    config = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    assert config["apiVersion"].startswith("skaffold/v4")
    artifacts = {a["image"]: a for a in config["build"]["artifacts"]}
    assert set(artifacts) == {f"tailor-{c}" for c in COMPONENTS}
    for name in COMPONENTS:
        dockerfile = artifacts[f"tailor-{name}"]["docker"]["dockerfile"]
        assert REPO / dockerfile == DOCKERFILES[name]
    release = config["manifests"]["helm"]["releases"][0]
    assert (REPO / release["chartPath"] / "Chart.yaml").is_file()
    for name in COMPONENTS:
        assert f"IMAGE_REPO_tailor_{name}" in release["setValueTemplates"][f"{name}.image.repository"]
    for profile in config["profiles"]:
        for patch in profile.get("patches", []):
            assert patch["op"] in ("add", "remove", "replace") and patch["path"].startswith("/")


def test_plain_manifests_have_a_deployment_and_service_per_component():
    base = REPO / "k8s" / "base"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (base / resource).is_file()
    docs = [d for d in yaml.safe_load_all((base / "tailor.yaml").read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    values = _values()
    for name in COMPONENTS:
        assert ("Deployment", f"tailor-{name}") in kinds
        assert ("Service", f"tailor-{name}") in kinds
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        name = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["grpc"]["port"] == values[name]["port"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
