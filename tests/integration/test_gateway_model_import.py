"""Bringing a model through a real gateway process: `tailor models import --hub` and a pipeline whose
model is `hub:` (huggingface_hub's own code, HF_HUB_OFFLINE=1 on a cache laid out as the library lays it
out; no live download runs here), and an upload of a few-hundred-MB sharded folder whose gateway memory
(VmHWM from /proc) stays under a bound that a buffering gateway would exceed."""

from __future__ import annotations

import time

import grpc
import pytest
import yaml
from support.big_model import GatewayProcess, rss_kb, write_sharded_model
from support.families import tiny_model
from support.hf_cache import write_hub_cache

from tailor.gateway.v1 import gateway_service_pb2 as gw
from tailor.transfer import import_hub, upload
from tailor_cli import main as cli

pytestmark = pytest.mark.integration
REPO = "acme/tiny-qwen2"


@pytest.fixture(scope="module")
def hub_gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubgw")
    cache = root / "hf-cache"
    commit = write_hub_cache(cache, REPO, tiny_model("qwen2", root / "model"))
    g = GatewayProcess(
        root / "state",
        extra_env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "TAILOR_GRACE_SECONDS": "1"},
    )
    g.start()
    g.commit = g_commit = commit
    assert g_commit
    yield g
    g.stop()


def test_models_import_hub_prints_the_id_and_the_second_downloads_nothing(hub_gateway, monkeypatch, capsys):
    monkeypatch.setenv("TAILOR_GATEWAY", hub_gateway.address)
    monkeypatch.setenv("TAILOR_TOKEN", hub_gateway.token)
    assert cli.main(["models", "import", "--hub", REPO]) == 0
    artifact_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(artifact_id) == 64

    conn = hub_gateway.connection()
    again = import_hub(conn, REPO, hub_gateway.commit)
    assert again.cached and again.artifact.id == artifact_id and again.commit == hub_gateway.commit
    manifest = yaml.safe_load(again.manifest_json)
    assert manifest["format"] == "hf-safetensors"
    assert manifest["recipe"] == {"stage": "import", "hub": REPO, "commit": hub_gateway.commit}
    listed = conn.gateway_stub().ListArtifacts(
        gw.ListArtifactsRequest(kind="model"), metadata=conn.metadata()
    )
    assert artifact_id in {a.id for a in listed.artifacts}  # owned by the caller's project


def test_a_repo_outside_the_offline_cache_is_unavailable_with_what_to_do(hub_gateway):
    with pytest.raises(grpc.RpcError) as err:
        import_hub(hub_gateway.connection(), "acme/not-cached")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "HF_HUB_OFFLINE is set" in err.value.details() and "artifact:" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        import_hub(hub_gateway.connection(), "not a repo")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_pipeline_with_a_hub_model_imports_it_first(hub_gateway, tmp_path):
    conn = hub_gateway.connection()
    text = tmp_path / "eval.txt"
    text.write_text("Once upon a time there was a tiny model.\n" * 20)
    spec = {
        "name": "hub-model",
        "model": {"hub": REPO, "revision": "main"},
        "data": {"eval": {"artifact": upload(conn, text).artifact.id}},
    }
    stub = conn.gateway_stub()
    p = stub.CreatePipeline(
        gw.CreatePipelineRequest(spec_yaml=yaml.safe_dump(spec)), metadata=conn.metadata()
    )
    expected = import_hub(conn, REPO).artifact.id
    deadline = time.monotonic() + 60
    while True:
        got = stub.GetPipeline(gw.GetPipelineRequest(pipeline_id=p.id), metadata=conn.metadata())
        stage = next(s for s in got.stages if s.name == "import")
        if stage.results or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [r.id for r in stage.results] == [expected]
    assert stage.cached  # imported by the test above: found by repo and commit, nothing fetched
    stub.CancelPipeline(gw.CancelPipelineRequest(pipeline_id=p.id), metadata=conn.metadata())


UPLOAD_MB = 384
BOUND_MB = 128  # a gateway that held the upload (or one file of it) in memory would exceed this


def test_upload_of_a_sharded_folder_keeps_the_gateway_memory_bounded(tmp_path):
    folder = tmp_path / "sharded"
    written = write_sharded_model(folder, UPLOAD_MB << 20, shard_bytes=128 << 20)
    assert written > 3 * (BOUND_MB << 20)
    g = GatewayProcess(tmp_path / "state", extra_env={"TAILOR_GRACE_SECONDS": "1"}).start()
    try:
        before = rss_kb(g.proc.pid)
        reply = upload(g.connection(), folder)
        after = rss_kb(g.proc.pid)
    finally:
        g.stop()
    manifest = yaml.safe_load(reply.manifest_json)
    assert sum(f["size"] for f in manifest["files"]) == sum(f.stat().st_size for f in folder.iterdir())
    assert manifest["format"] == "hf-safetensors"
    peak_growth_mb = (after["VmHWM"] - before["VmRSS"]) / 1024
    print(f"gateway RSS before {before}, after {after} kB: peak growth {peak_growth_mb:.1f} MB")
    assert peak_growth_mb < BOUND_MB, (before, after)
