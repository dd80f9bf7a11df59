"""One real local stack for the web tests, with its web front (`python -m tailor_web`, started by the
Stack as `tailor up` starts it), reached over HTTP only."""

from __future__ import annotations

import httpx
import pytest
import yaml
from support.remote_stack import started_stack
from web_client import EVAL, MODEL, QUICK_BENCHMARK, auth, upload_folder


@pytest.fixture(scope="session")
def web_stack(tmp_path_factory):
    with started_stack(tmp_path_factory.mktemp("web-stack"), first_port=53000) as stack:
        yield stack


@pytest.fixture(scope="session")
def http(web_stack) -> httpx.Client:
    # trust_env off: a proxy from the environment must not see the local stack's tokens.
    with httpx.Client(base_url=web_stack.web_url, timeout=300, trust_env=False) as client:
        yield client


@pytest.fixture(scope="session")
def inputs(web_stack, http) -> dict:
    """The bundled model (multipart) and eval text (one raw file) uploaded over HTTP: both replies."""
    model = upload_folder(http, web_stack.token, MODEL, "model", "hf-safetensors")
    with EVAL.open("rb") as handle:
        data = http.post("/api/v1/artifacts", params={"kind": "dataset", "format": "text", "path": EVAL.name},
                         content=handle,
                         headers={**auth(web_stack.token), "Content-Type": "application/octet-stream"})  # fmt: skip
    assert data.status_code == 200, data.text
    return {"model": model, "dataset": data.json()}


@pytest.fixture(scope="session")
def quick_spec(inputs):
    """quick_spec(name) -> YAML: one bf16 candidate beside the original, on the bundled model uploaded
    over HTTP, with a quick benchmark (tens of seconds here)."""

    def spec(name: str, **more) -> str:
        return yaml.safe_dump({"name": name, "model": {"artifact": inputs["model"]["artifact"]["id"]},
                               "data": {"eval": {"artifact": inputs["dataset"]["artifact"]["id"]}},
                               "quantize": [{"method": "bf16"}], "benchmark": QUICK_BENCHMARK, **more})  # fmt: skip

    return spec


@pytest.fixture(scope="session")
def submit(web_stack, http, quick_spec):
    """submit(name, **more) -> the created Pipeline's JSON (quick_spec's pipeline, submitted over HTTP)."""

    def submit_one(name: str, **more) -> dict:
        reply = http.post(
            "/api/v1/pipelines", json={"spec_yaml": quick_spec(name, **more)}, headers=auth(web_stack.token)
        )
        assert reply.status_code == 200, reply.text
        return reply.json()

    return submit_one
