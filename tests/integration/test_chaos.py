"""Chaos, short form: a pipeline runs while a quantizer is SIGKILLed mid-operation and then the gateway
is SIGKILLed and restarted. The pipeline completes, every artifact's hashes verify, nothing is published
twice. Also: cancellation reaches the workers, and projects cannot see each other's pipelines or artifacts.

Stage work is the clearly named test mode (TAILOR_FAKE_WORK=instant, each operation taking 2 s) on a
local store, so the test is about the gateway's durability, not about models, and stays fast.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
import yaml
from support.examples import upload_example_inputs

from tailor.common.v1 import common_pb2 as common
from tailor.common.v1 import common_pb2_grpc as common_grpc
from tailor.connection import Connection
from tailor.gateway.v1 import gateway_service_pb2 as gw
from tailor.transfer import download, upload
from tailor_cli.stack import Stack, free_base_port
from tailor_gateway.access import Access
from tailor_gateway.state import StateStore
from tailor_runtime.store import open_store
from tailor_runtime.store.manifest import recipe_key, sha256_file

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OP_SECONDS = 2.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(
        tmp_path_factory.mktemp("chaos"),
        base_port=free_base_port({"quantizer": 2}),
        replicas={"quantizer": 2},
        extra_env={
            "TAILOR_FAKE_WORK": "instant",
            "TAILOR_FAKE_WORK_SECONDS": str(OP_SECONDS),
            "TAILOR_WORKER_LOST_AFTER_S": "2",
            # A worker silent this long whose health check also fails (or times out) counts as hung.
            "TAILOR_WORKER_STALL_S": "3",
            "TAILOR_GRACE_SECONDS": "2",
        },
    )
    s.start(timeout=120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def conn(stack) -> Connection:
    return stack.connection()


@pytest.fixture(scope="module")
def inputs(conn) -> dict:
    return upload_example_inputs(conn)


def _spec(inputs: dict, name: str) -> str:
    spec = {
        "name": name,
        **inputs,
        "quantize": [{"method": "bf16"}, {"method": "int8_dynamic"}, {"method": "nf4"}],
        "export": {"format": "onnx"},
    }
    return yaml.safe_dump(spec)


def _get(conn, pipeline_id: str) -> gw.Pipeline:
    request = gw.GetPipelineRequest(pipeline_id=pipeline_id)
    for _ in range(100):  # the gateway may be restarting
        try:
            return conn.gateway_stub().GetPipeline(request, metadata=conn.metadata(), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(0.2)
    raise AssertionError("gateway did not come back")


def _wait_for(conn, pipeline_id: str, predicate, timeout: float = 60.0) -> gw.Pipeline:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = _get(conn, pipeline_id)
        if predicate(p):
            return p
        time.sleep(0.1)
    raise AssertionError(f"timed out; last state: {gw.PipelineState.Name(p.state)} {p.error.message}")


def _running(p: gw.Pipeline, prefix: str):
    return [s for s in p.stages if s.name.startswith(prefix) and s.state == common.OPERATION_STATE_RUNNING]


TERMINAL = (gw.PIPELINE_STATE_SUCCEEDED, gw.PIPELINE_STATE_FAILED, gw.PIPELINE_STATE_CANCELLED)


def test_pipeline_survives_a_killed_worker_and_a_killed_gateway(stack, conn, inputs):
    create = gw.CreatePipelineRequest(spec_yaml=_spec(inputs, "chaos"), idempotency_key="chaos-1")
    p = conn.gateway_stub().CreatePipeline(create, metadata=conn.metadata())

    # 1. A quantizer dies mid-operation: the stage goes to the other quantizer of the pool.
    p = _wait_for(conn, p.id, lambda p: _running(p, "quantize/"))
    victim_stage = _running(p, "quantize/")[0]
    victim = next(n for n in ("quantizer", "quantizer-2") if stack.address(n) == victim_stage.worker)
    stack.kill(victim)

    # 2. The gateway dies while benchmarks run, and comes back.
    p = _wait_for(conn, p.id, lambda p: _running(p, "benchmark/"))
    stack.kill("gateway")
    stack.restart("gateway")
    # A retried submission after the crash still gets the same pipeline.
    again = conn.gateway_stub().CreatePipeline(create, metadata=conn.metadata())
    assert again.id == p.id

    final = _wait_for(conn, p.id, lambda p: p.state in TERMINAL, timeout=90)
    assert final.state == gw.PIPELINE_STATE_SUCCEEDED, final.error.message
    stages = {s.name: s for s in final.stages}
    moved = stages[victim_stage.name]
    assert moved.attempts == 2 and moved.worker != victim_stage.worker
    assert all(s.attempts <= 2 for s in final.stages)

    # Every artifact the pipeline produced verifies, downloaded through the gateway.
    store = open_store(str(stack.state_dir / "store"))
    produced = [r.id for s in final.stages for r in s.results] + [final.report.id]
    for artifact_id in produced:
        manifest = store.get_manifest(artifact_id)  # checks the manifest against its id
        dest = stack.state_dir / "check" / artifact_id
        download(conn, artifact_id, dest)
        for entry in manifest.files:
            assert sha256_file(dest / entry.path) == entry.sha256

    # Nothing published twice: one artifact per recipe, and no half-published artifact.
    per_recipe = collections.Counter(
        recipe_key(m.recipe) for _, m in store.list_manifests() if m.recipe.get("stage") != "upload"
    )
    assert max(per_recipe.values()) == 1, per_recipe
    artifacts_dir = stack.state_dir / "store" / "artifacts"
    assert all((d / "manifest.json").exists() for d in artifacts_dir.iterdir())


def test_a_hung_worker_is_noticed_and_its_stage_moves(stack, conn, inputs):
    """SIGSTOP: the worker keeps its connections open but answers nothing. The gateway's per-event
    deadline and a failed health check see it; the stage goes to the other quantizer, and the stopped
    worker, once it runs again, is told to cancel, so it publishes nothing of its own."""
    for name in ("quantizer", "quantizer-2"):  # the first test SIGKILLed one of them
        if stack.processes[name].poll() is not None:
            stack.restart(name)
    spec = yaml.safe_load(_spec(inputs, "hung"))
    spec.pop("export")  # one candidate, no export: short
    spec["quantize"] = [{"method": "int8_dynamic", "seed": 7}]
    p = conn.gateway_stub().CreatePipeline(
        gw.CreatePipelineRequest(spec_yaml=yaml.safe_dump(spec)), metadata=conn.metadata()
    )
    p = _wait_for(conn, p.id, lambda p: _running(p, "quantize/"))
    stalled = _running(p, "quantize/")[0]
    victim = next(n for n in ("quantizer", "quantizer-2") if stack.address(n) == stalled.worker)
    pid = stack.processes[victim].pid
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        _wait_for(conn, p.id, lambda p: {s.name: s for s in p.stages}[stalled.name].attempts == 2, timeout=30)
        # How long the stall took to notice is a timing, not a verdict (a loaded CI machine varies): printed
        # for the log; the test asserts only that the stage was re-dispatched within _wait_for's deadline.
        print(f"stalled worker noticed and the stage moved after {time.monotonic() - stopped_at:.1f}s")
        final = _wait_for(conn, p.id, lambda p: p.state in TERMINAL, timeout=30)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert final.state == gw.PIPELINE_STATE_SUCCEEDED, final.error.message
    moved = {s.name: s for s in final.stages}[stalled.name]
    assert moved.attempts == 2 and moved.worker != stalled.worker

    # Woken up, the stopped worker gets the cancel that waited for it: its copy ends CANCELLED.
    worker_ops = common_grpc.OperationsServiceStub(stack.worker_channel(stalled.worker))
    request = common.GetOperationRequest(operation_id=stalled.operation_id)
    deadline = time.monotonic() + 10
    op = worker_ops.GetOperation(request, timeout=5)
    while (
        op.state
        not in (
            common.OPERATION_STATE_SUCCEEDED,
            common.OPERATION_STATE_FAILED,
            common.OPERATION_STATE_CANCELLED,
        )
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
        op = worker_ops.GetOperation(request, timeout=5)
    assert op.state == common.OPERATION_STATE_CANCELLED and not op.results
    store = open_store(str(stack.state_dir / "store"))
    per_recipe = collections.Counter(
        recipe_key(m.recipe) for _, m in store.list_manifests() if m.recipe.get("stage") != "upload"
    )
    assert max(per_recipe.values()) == 1, per_recipe


def test_cancel_reaches_the_workers_and_publishes_no_report(stack, conn, inputs):
    spec = yaml.safe_load(_spec(inputs, "cancel-me"))
    # Seeds no other test uses: a recipe already published would be answered from the cache at once
    # (SUCCEEDED, cached) and there would be nothing left running to cancel.
    spec["quantize"] = [{**q, "seed": 13} for q in spec["quantize"]]
    p = conn.gateway_stub().CreatePipeline(
        gw.CreatePipelineRequest(spec_yaml=yaml.safe_dump(spec)), metadata=conn.metadata()
    )
    p = _wait_for(conn, p.id, lambda p: _running(p, "quantize/"))
    running = _running(p, "quantize/")[0]
    cancelled = conn.gateway_stub().CancelPipeline(
        gw.CancelPipelineRequest(pipeline_id=p.id), metadata=conn.metadata()
    )
    assert cancelled.state == gw.PIPELINE_STATE_CANCELLED
    worker_ops = common_grpc.OperationsServiceStub(stack.worker_channel(running.worker))
    op = worker_ops.GetOperation(common.GetOperationRequest(operation_id=running.operation_id))
    deadline = time.monotonic() + 10
    while op.state != common.OPERATION_STATE_CANCELLED and time.monotonic() < deadline:
        time.sleep(0.1)
        op = worker_ops.GetOperation(common.GetOperationRequest(operation_id=running.operation_id))
    assert op.state == common.OPERATION_STATE_CANCELLED and not op.results
    time.sleep(1)
    final = _get(conn, p.id)
    assert final.state == gw.PIPELINE_STATE_CANCELLED and not final.report.id


def test_projects_cannot_reach_each_other(stack, conn, inputs):
    access = Access(StateStore(stack.state_dir / "gateway.db").db)
    token_b, info_b = access.create_token("team-b")
    other = Connection(conn.gateway, token_b)
    stub, meta_b = conn.gateway_stub(), other.metadata()
    mine = stub.ListPipelines(gw.ListPipelinesRequest(), metadata=conn.metadata()).pipelines
    assert mine
    assert stub.ListPipelines(gw.ListPipelinesRequest(), metadata=meta_b).pipelines == []
    assert stub.ListArtifacts(gw.ListArtifactsRequest(), metadata=meta_b).artifacts == []
    model_id = inputs["model"]["artifact"]
    calls = [
        lambda: stub.GetPipeline(gw.GetPipelineRequest(pipeline_id=mine[0].id), metadata=meta_b),
        lambda: stub.CancelPipeline(gw.CancelPipelineRequest(pipeline_id=mine[0].id), metadata=meta_b),
        lambda: stub.GetArtifact(gw.GetArtifactRequest(artifact_id=model_id), metadata=meta_b),
        lambda: list(
            stub.DownloadArtifact(gw.DownloadArtifactRequest(artifact_id=model_id), metadata=meta_b)
        ),
        # Nor can it use another project's model in a pipeline of its own.
        lambda: stub.CreatePipeline(
            gw.CreatePipelineRequest(spec_yaml=_spec(inputs, "steal")), metadata=meta_b
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The same bytes uploaded by team-b become team-b's too (content addressing), and only then usable.
    assert upload(other, EXAMPLES / "models" / "stories260K").artifact.id == model_id
    stub.GetArtifact(gw.GetArtifactRequest(artifact_id=model_id), metadata=meta_b)

    # Revoked: refused at the very next call. The audit table saw all of it.
    access.revoke_token(info_b.id)
    with pytest.raises(grpc.RpcError) as err:
        stub.ListPipelines(gw.ListPipelinesRequest(), metadata=meta_b)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    actions = {r["action"] for r in access.audit_log(limit=1000)}
    assert {"pipeline.create", "pipeline.cancel", "artifact.upload", "artifact.download"} <= actions
    log_lines = (stack.state_dir / "logs" / "gateway.log").read_text().splitlines()
    audit_lines = [json.loads(x) for x in log_lines if '"audit": true' in x]
    assert any(line["action"] == "artifact.upload" for line in audit_lines)
    assert stack.token not in "\n".join(log_lines)
