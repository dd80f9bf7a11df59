"""skaffold.yaml, checked for structure (no skaffold binary here): one artifact per service built from a
Dockerfile that exists, the chart deployed with every image, and the cpu, gpu and dev profiles."""

from __future__ import annotations

import pytest
import yaml
from deploy_support import CHART, COMPONENTS, REPO

CONFIG = yaml.safe_load((REPO / "skaffold.yaml").read_text())
RELEASE = CONFIG["deploy"]["helm"]["releases"][0]
PROFILES = {p["name"]: p for p in CONFIG["profiles"]}


def _apply_patches(profile: dict) -> dict:
    """The release as the profile leaves it (the JSON-patch 'add' ops skaffold would apply)."""
    release = dict(RELEASE)
    for patch in profile.get("patches", []):
        assert patch["op"] == "add" and patch["path"].startswith("/deploy/helm/releases/0/"), patch
        release[patch["path"].rsplit("/", 1)[1]] = patch["value"]
    return release


def test_api_version_and_kind():
    assert CONFIG["apiVersion"] == "skaffold/v4beta11"
    assert CONFIG["kind"] == "Config"


def test_one_artifact_per_service_with_an_existing_dockerfile():
    artifacts = CONFIG["build"]["artifacts"]
    assert sorted(a["image"] for a in artifacts) == sorted(f"tailor-{c}" for c in COMPONENTS)
    for artifact in artifacts:
        assert artifact["context"] == "."  # every Dockerfile copies protos/ and runtime/ from the root
        dockerfile = REPO / artifact["docker"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        component = artifact["image"].removeprefix("tailor-")
        assert f'CMD ["python", "-m", "tailor_{component}"]' in dockerfile.read_text()


def test_the_chart_is_deployed_with_every_built_image():
    assert REPO / RELEASE["chartPath"] == CHART
    templates = RELEASE["setValueTemplates"]
    # component -> the image it runs from: the web front has none of its own (the gateway's has tailor_web).
    images = {**{name: name for name in COMPONENTS}, "web": "gateway"}
    for name, image in images.items():
        key = image.replace("-", "_")
        assert templates[f"{name}.image.repository"] == f"{{{{.IMAGE_REPO_tailor_{key}}}}}"
        assert (
            templates[f"{name}.image.tag"]
            == f"{{{{.IMAGE_TAG_tailor_{key}}}}}@{{{{.IMAGE_DIGEST_tailor_{key}}}}}"
        )


@pytest.mark.parametrize(("profile", "values"), [("cpu", "cpu"), ("gpu", "gpu"), ("dev", "cpu")])
def test_profiles_use_the_chart_value_sets(profile, values):
    release = _apply_patches(PROFILES[profile])
    assert release["valuesFiles"] == [f"charts/tailor/ci/{values}-values.yaml"]
    assert (REPO / release["valuesFiles"][0]).is_file()


def test_dev_profile_forwards_the_gateway():
    dev = PROFILES["dev"]
    assert {"command": "dev"} in dev["activation"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    forwards = {(f["resourceType"], f["resourceName"], f["port"]) for f in dev["portForward"]}
    assert ("service", "tailor-gateway", values["gateway"]["port"]) in forwards
    assert ("service", "tailor-gateway", values["metrics"]["port"]) in forwards
    assert all(f["namespace"] == RELEASE["namespace"] for f in dev["portForward"])
