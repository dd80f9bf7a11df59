"""k8s/: the kustomize base and the cpu and gpu overlays are the chart's own rendering (re-rendered here and
compared byte for byte), and each overlay builds into valid Kubernetes 1.32 objects."""

from __future__ import annotations

import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml
from deploy_support import COMPONENTS, KUBE_VERSION, REPO, render_tool

K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")


def test_manifests_match_a_fresh_render_of_the_chart(helm):
    stale = render_tool().stale_files()
    assert not stale, f"{stale} differ from the chart: run `python tools/render_k8s.py` and commit the result"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_plus_base_is_the_chart_rendered_with_the_profile_values(helm, overlay):
    tool = render_tool()
    expected = tool.documents(tool.helm_template(tool.PROFILES[overlay], *tool.K8S_ARGS))
    ours = tool.documents((K8S / "base" / "tailor.yaml").read_text())
    ours += tool.documents((K8S / "overlays" / overlay / "tailor.yaml").read_text())
    key = lambda docs: sorted(yaml.safe_dump(yaml.safe_load(d), sort_keys=True) for d in docs)  # noqa: E731
    assert key(ours) == key(expected)


@pytest.mark.parametrize("directory", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_kustomizations_name_files_that_exist(directory):
    folder = K8S / directory
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "tailor"
    for resource in kustomization["resources"]:
        assert (folder / resource).exists(), f"{directory}: {resource} is missing"
    if directory.startswith("overlays/"):
        assert "../../base" in kustomization["resources"]
        assert {i["name"] for i in kustomization["images"]} == {f"tailor-{c}" for c in COMPONENTS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_with_kustomize_into_valid_objects(overlay):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip(
            "kubectl (with its built-in kustomize) is not installed; the byte-for-byte check above still ran"
        )
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("Namespace", "tailor") in kinds
    for name in (*COMPONENTS, "triton"):
        assert ("Service", f"tailor-{name}") in kinds
        # one Deployment per pool: tailor-<component> or tailor-<component>-<pool>
        assert any(k == "Deployment" and n.startswith(f"tailor-{name}") for k, n in kinds), name
    for obj in objects:
        if (
            obj["kind"] == "ServiceMonitor"
        ):  # a CRD: no schema in kubernetes-validate (test_chart.py checks it)
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "tailor", obj["metadata"]["name"]
