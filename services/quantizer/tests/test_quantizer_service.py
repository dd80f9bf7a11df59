"""The quantizer as a real process over real gRPC: the accuracy gate refuses without publishing, bad
requests are named, and the worker keeps serving after a refusal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from support.ports import free_port

from tailor.common.v1 import common_pb2 as common
from tailor.common.v1 import common_pb2_grpc as common_grpc
from tailor.quantizer.v1 import quantizer_service_pb2 as pb
from tailor.quantizer.v1 import quantizer_service_pb2_grpc as pb_grpc
from tailor_cli.stack import health_status
from tailor_runtime.store import open_store

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples" / "models" / "stories260K"
EVAL = REPO / "examples" / "data" / "tinystories_eval.txt"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantizer")
    store = open_store(str(root / "store"))
    model = store.publish_directory(MODEL, kind="model", format="hf-safetensors", name="stories260K")
    data = root / "eval"
    data.mkdir()
    shutil.copy(EVAL, data / "eval.txt")
    eval_data = store.publish_directory(data, kind="dataset", format="text", name="eval")
    port = free_port()
    env = {
        **os.environ,
        "TAILOR_STORE_URL": str(root / "store"),
        "TAILOR_CACHE_DIR": str(root / "cache"),
        "TAILOR_PORT": str(port),
        "TAILOR_INSECURE_OPEN_WORKER": "true",  # called directly, not through a gateway
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tailor_quantizer"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while health_status(address) != "SERVING":
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "quantizer never became SERVING"
        time.sleep(0.3)
    channel = grpc.insecure_channel(address)
    yield {"store": store, "model": model.id, "eval": eval_data.id, "channel": channel, "address": address}
    channel.close()
    proc.terminate()
    proc.wait(timeout=30)


def _run(worker, **fields) -> common.Operation:
    request = pb.QuantizeRequest(model=common.ArtifactRef(id=worker["model"]), **fields)
    op = pb_grpc.QuantizerServiceStub(worker["channel"]).Quantize(request)
    ops = common_grpc.OperationsServiceStub(worker["channel"])
    for event in ops.WatchOperation(common.WatchOperationRequest(operation_id=op.id)):
        if event.operation.state not in (common.OPERATION_STATE_PENDING, common.OPERATION_STATE_RUNNING):
            return event.operation
    raise AssertionError("the operation stream ended before the operation did")


def _models(store) -> set[str]:
    return {artifact_id for artifact_id, _ in store.list_manifests("model")}


@pytest.mark.slow
def test_gate_refusal_publishes_nothing_and_the_worker_keeps_serving(worker):
    before = _models(worker["store"])
    op = _run(
        worker,
        method="nf4",
        eval_data=common.ArtifactRef(id=worker["eval"]),
        gate=pb.AccuracyGate(max_perplexity_increase_pct=1),
    )
    assert op.state == common.OPERATION_STATE_FAILED
    assert op.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "accuracy gate rejected nf4" in op.error.message and "allowed: +1%" in op.error.message
    assert op.metrics["gate"] == "rejected" and op.metrics["perplexity_increase_pct"] > 1
    assert 0 < op.metrics["top1_agreement"] < 1 and op.metrics["parent_perplexity"] > 1
    assert _models(worker["store"]) == before, "a refused result must not be published"
    assert health_status(worker["address"]) == "SERVING"
    # The same worker then quantizes normally, and the manifest carries the gate's numbers.
    ok = _run(worker, method="bf16", eval_data=common.ArtifactRef(id=worker["eval"]))
    assert ok.state == common.OPERATION_STATE_SUCCEEDED, ok.error.message
    manifest = worker["store"].get_manifest(ok.results[0].id)
    assert manifest.metrics["gate"] == "passed" and abs(manifest.metrics["perplexity_increase_pct"]) < 0.5
    assert list(manifest.parents) == [worker["model"]]
    assert (
        manifest.recipe["libraries"]["torch"] and manifest.recipe["gate"]["max_perplexity_increase_pct"] == 5
    )


def test_bad_requests_are_named(worker):
    stub = pb_grpc.QuantizerServiceStub(worker["channel"])
    model = common.ArtifactRef(id=worker["model"])
    with pytest.raises(grpc.RpcError) as err:
        stub.Quantize(pb.QuantizeRequest(model=model, method="bf16"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "accuracy gate needs held-out text" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Quantize(
            pb.QuantizeRequest(
                model=model, method="bf16", gate=pb.AccuracyGate(max_perplexity_increase_pct=-1)
            )
        )
    assert "max_perplexity_increase_pct must be between 0 and 1000" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Quantize(pb.QuantizeRequest(model=model, method="llm_int8", config={"threshold": -2}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "threshold" in err.value.details()


def test_list_methods_says_what_runs_here_and_why_not(worker):
    reply = pb_grpc.QuantizerServiceStub(worker["channel"]).ListMethods(pb.ListMethodsRequest())
    by = {m.name: m for m in reply.methods}
    assert {"bf16", "fp16", "int8_dynamic", "llm_int8", "nf4", "fp4"} <= set(by)
    assert all(m.description and m.output_format and m.bits for m in reply.methods)
    for m in reply.methods:
        assert m.available or m.unavailable_reason, m.name
    assert by["nf4"].deterministic and [p.name for p in by["nf4"].parameters] == [
        "double_quant",
        "compute_dtype",
    ]


def test_out_of_memory_is_recognised_from_a_real_allocation_failure():
    import torch

    from tailor_runtime.errors import is_out_of_memory

    with pytest.raises(RuntimeError) as err:
        torch.empty(1 << 62, dtype=torch.uint8)  # a real allocator refusal, not a fabricated exception
    assert is_out_of_memory(err.value)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_a_gpu_only_method_on_this_worker_is_refused_with_the_reason(worker):
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this worker has an FP8 GPU: fp8 runs here")
    stub = pb_grpc.QuantizerServiceStub(worker["channel"])
    with pytest.raises(grpc.RpcError) as err:
        stub.Quantize(pb.QuantizeRequest(model=common.ArtifactRef(id=worker["model"]), method="fp8"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "method 'fp8' cannot run on this worker" in err.value.details()
    assert "compute capability 8.9" in err.value.details()
    assert health_status(worker["address"]) == "SERVING"
