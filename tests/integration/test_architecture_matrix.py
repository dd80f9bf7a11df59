"""Every registered architecture family through a whole pipeline via the gateway, on the CPU.

For each family a tiny model is built from its transformers config class (random weights, stories260K's
tokenizer: plumbing, parity and export checks only) and saved exactly as `save_pretrained` writes it,
with no tailor_format.json. It is uploaded as a user would, then fine-tuned (LoRA), quantized (dynamic
INT8 and one more method per family, so that every method runs on several families), benchmarked,
selected, exported (each format verified against its source before it is published) and reported. The
methods and formats rotate over the families so that the matrix stays inside CI's time; each format's
own tests cover it on every family. Combinations the registry refuses are refused at submit.
"""

from __future__ import annotations

import grpc
import pytest
import yaml
from support.families import EXAMPLES, tiny_model

from tailor.common.v1 import common_pb2 as common
from tailor.connection import Connection
from tailor.gateway.v1 import gateway_service_pb2 as gw
from tailor.transfer import upload
from tailor_cli.stack import Stack, free_base_port
from tailor_runtime.ml import architectures

pytestmark = pytest.mark.integration

# family -> (the quantize methods, the export format). GPT-2 and Mixtral have no ONNX export and take
# fewer methods: the registry says why, and the refusals are tested below; GGUF takes every family.
MATRIX = {
    "llama": (["int8_dynamic", "gptq"], "executorch"),
    "llama3": (["int8_dynamic", "awq"], "onnx"),
    "mistral": (["int8_dynamic", "nf4"], "onnx-int8"),
    "qwen2": (["int8_dynamic", "awq"], "onnx"),
    "qwen3": (["int8_dynamic", "gptq"], "onnx-int8"),
    "phi3": (["int8_dynamic", "nf4"], "onnx"),
    "gemma2": (["int8_dynamic", "rtn"], "onnx-int8"),
    "gemma3": (["int8_dynamic", "nf4"], "onnx"),
    "gpt2": (["nf4", "gguf_q8_0"], "gguf"),
    "mixtral": (["bf16"], "gguf"),
}
FAMILY_OF = {"llama3": "llama"}  # test model name -> registry family, where they differ
GROUPED = {"gptq", "awq", "rtn"}  # tiny layers are 64 wide: groups of 32

BENCHMARK = {
    "max_eval_tokens": 256,
    "context_length": 64,
    "stride": 64,
    "latency_new_tokens": 4,
    "warmup": 0,
    "repetitions": 1,
    "threads": 1,
}


def _spec(name: str, model: str, data: dict, methods: list[str], export: str | None) -> str:
    quantize = []
    for method in methods:
        entry = {"method": method, "gate": {"disabled": True}}  # random weights: quality is not the point
        if method in GROUPED:
            entry["config"] = {"group_size": 32}
        if method in ("gptq", "awq"):
            entry["calibration"] = {"samples": 8, "seq_len": 64}
        quantize.append(entry)
    spec = {
        "apiVersion": "tailor.dev/v1",
        "kind": "Pipeline",
        "name": f"matrix-{name}",
        "model": {"artifact": model},
        "data": data,
        "finetune": {"method": "lora", "config": {"steps": 2, "batch_size": 2, "seq_len": 32, "r": 4}},
        "quantize": quantize,
        "benchmark": {"config": BENCHMARK},
        "select": {"constraints": {"max_perplexity_increase_pct": 1000}},
    }
    if export is not None:
        spec["export"] = {"format": export}
    return yaml.safe_dump(spec)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(
        tmp_path_factory.mktemp("matrix-stack"),
        base_port=free_base_port(),
        extra_env={"TAILOR_GRACE_SECONDS": "2"},
    )
    s.start(timeout=300)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def uploaded(stack, tmp_path_factory) -> tuple[Connection, dict[str, str], dict]:
    conn = stack.connection()
    root = tmp_path_factory.mktemp("families")
    models = {name: upload(conn, tiny_model(name, root / name)).artifact.id for name in MATRIX}
    data = {
        "train": {"artifact": upload(conn, EXAMPLES / "data" / "tinystories_train.txt").artifact.id},
        "eval": {"artifact": upload(conn, EXAMPLES / "data" / "tinystories_eval.txt").artifact.id},
    }
    return conn, models, data


@pytest.fixture(scope="module")
def finished(uploaded) -> dict[str, gw.Pipeline]:
    """Submit every family's pipeline at once, then follow each to its end."""
    conn, models, data = uploaded
    stub = conn.gateway_stub()
    ids = {}
    for name, (methods, export) in MATRIX.items():
        spec = _spec(name, models[name], data, methods, export)
        ids[name] = stub.CreatePipeline(gw.CreatePipelineRequest(spec_yaml=spec), metadata=conn.metadata()).id
    results = {}
    for name, pipeline_id in ids.items():
        events = stub.WatchPipeline(
            gw.WatchPipelineRequest(pipeline_id=pipeline_id), metadata=conn.metadata()
        )
        results[name] = list(events)[-1].pipeline
    return results


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_every_stage_succeeds_for_the_family(finished, name):
    from google.protobuf import json_format

    pipeline = finished[name]
    states = {s.name: common.OperationState.Name(s.state) for s in pipeline.stages}
    assert gw.PipelineState.Name(pipeline.state) == "PIPELINE_STATE_SUCCEEDED", (
        pipeline.error.message,
        states,
    )
    methods, export = MATRIX[name]
    expected = {"finetune", "benchmark/original", "select", "report"} | ({"export"} if export else set())
    expected |= {f"{stage}/{m}" for m in methods for stage in ("quantize", "benchmark")}
    assert expected <= set(states), states
    assert {s for s in states.values()} == {"OPERATION_STATE_SUCCEEDED"}, states
    summary = json_format.MessageToDict(pipeline.summary)
    assert summary["recommended"]
    assert summary["finetune"]["steps"] == 2
    if export:  # verified against the candidate it was made from before it was published
        assert summary["export"]["format"] == export
        assert summary["export"]["artifact_id"]


REFUSED = [
    ("qwen2", {"export": {"format": "coreml"}}, "'coreml' cannot take this qwen2 model"),
    ("gpt2", {"quantize": [{"method": "gptq"}]}, "'gptq' cannot take this gpt2 model: llm-compressor"),
    ("mixtral", {"quantize": [{"method": "nf4"}]}, "'nf4' cannot take this mixtral model: transformers 5"),
]


@pytest.mark.parametrize("name, change, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_what_a_family_cannot_take_is_refused_at_submit(uploaded, name, change, message):
    conn, models, data = uploaded
    spec = {**yaml.safe_load(_spec(name, models[name], data, ["bf16"], "onnx")), **change}
    family = FAMILY_OF.get(name, name)
    stage, wanted = next(iter(change.items()))
    capability = (
        f"{stage}/{(wanted[0] if isinstance(wanted, list) else wanted).get('method') or wanted['format']}"
    )
    assert architectures.get(family).refusal(capability)  # the registry is where the refusal comes from
    with pytest.raises(grpc.RpcError) as err:
        conn.gateway_stub().CreatePipeline(
            gw.CreatePipelineRequest(spec_yaml=yaml.safe_dump(spec)), metadata=conn.metadata()
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
