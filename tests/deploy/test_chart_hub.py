"""The gateway's Hugging Face settings: HF_HOME on the cache volume, HF_TOKEN only from a named Secret."""

from __future__ import annotations

import subprocess

import yaml
from deploy_support import CHART

KUBE_VERSION = "1.32.0"


def _gateway_env(helm: str, *args: str) -> dict[str, dict]:
    cmd = [helm, "template", "tailor", str(CHART), "--namespace", "tailor", "--kube-version", KUBE_VERSION]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for doc in yaml.safe_load_all(done.stdout):
        if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith("gateway"):
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            return {e["name"]: e for e in container["env"]}
    raise AssertionError("no gateway Deployment rendered")


def test_no_token_by_default_and_the_hub_cache_on_the_cache_volume(helm):
    env = _gateway_env(helm)
    assert "HF_TOKEN" not in env and "HF_HUB_OFFLINE" not in env
    assert env["HF_HOME"]["value"] == "/var/cache/tailor/huggingface"


def test_token_comes_from_the_named_secret_never_a_value(helm):
    env = _gateway_env(helm, "--set", "hub.tokenSecret=tailor-hf-token,hub.offline=true")
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "tailor-hf-token", "key": "token"}},
    }
    assert env["HF_HUB_OFFLINE"]["value"] == "1"


def test_a_bad_secret_name_is_refused_by_the_schema(helm):
    cmd = [helm, "template", "tailor", str(CHART), "--set", "hub.tokenSecret=Not_A_Name"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode != 0 and "tokenSecret" in done.stderr
