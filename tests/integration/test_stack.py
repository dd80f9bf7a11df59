"""The whole stack as separate processes, the store on a real S3 server (Ceph RGW), a short quickstart
through the gateway; then artifacts, lineage, health, metrics, one trace, and bad requests."""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import boto3
import grpc
import pytest
import yaml
from support.examples import upload_example_inputs

from tailor.common.v1 import common_pb2 as common
from tailor.connection import Connection
from tailor.gateway.v1 import gateway_service_pb2 as gw
from tailor.quantizer.v1 import quantizer_service_pb2 as qpb
from tailor.quantizer.v1 import quantizer_service_pb2_grpc as qgrpc
from tailor.transfer import download
from tailor_cli.stack import SERVICES, Stack, free_base_port, health_status
from tailor_runtime.store.manifest import sha256_file

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BUCKET = "tailor-it"

SHORT_SPEC = {
    "apiVersion": "tailor.dev/v1",
    "kind": "Pipeline",
    "name": "quickstart-short",
    "finetune": {"method": "lora", "config": {"steps": 4, "batch_size": 4, "seq_len": 64}},
    # nf4 loses about 12% on this tiny model: allowed here so it is benchmarked; fp4 with a 1% gate is
    # refused by the quantizer's accuracy gate, which must not fail the pipeline.
    "quantize": [
        {"method": "bf16"},
        {"method": "int8_dynamic"},
        {"method": "nf4", "gate": {"max_perplexity_increase_pct": 50}},
        {"method": "fp4", "gate": {"max_perplexity_increase_pct": 1}},
    ],
    "benchmark": {
        "config": {
            "max_eval_tokens": 1024,
            "context_length": 128,
            "stride": 64,
            "latency_new_tokens": 8,
            "warmup": 0,
            "repetitions": 1,
        }
    },
    "select": {"constraints": {"max_memory_mb": 4096, "max_perplexity_increase_pct": 5}},
    "export": {"target": "cpu-x86"},  # its default format: onnx-int8
}


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    s = Stack(
        state,
        base_port=free_base_port(),
        store_url=f"s3://{BUCKET}/{prefix}",
        extra_env={
            "TAILOR_S3_ENDPOINT_URL": s3_server.endpoint,
            "TAILOR_S3_ACCESS_KEY": s3_server.access_key,
            "TAILOR_S3_SECRET_KEY": s3_server.secret_key,
            "TAILOR_S3_CREATE_BUCKET": "true",
            "TAILOR_GRACE_SECONDS": "5",
        },
    )
    s.start(timeout=240)
    s.prefix = prefix
    yield s
    s.stop()


@pytest.fixture(scope="module")
def conn(stack) -> Connection:
    return stack.connection()


@pytest.fixture(scope="module")
def finished(stack, conn):
    """Run the short quickstart through the gateway once; the tests below inspect what it left."""
    spec = {**SHORT_SPEC, **upload_example_inputs(conn)}
    stub = conn.gateway_stub()
    request = gw.CreatePipelineRequest(spec_yaml=yaml.safe_dump(spec), idempotency_key="it-1")
    p = stub.CreatePipeline(request, metadata=conn.metadata())
    again = stub.CreatePipeline(request, metadata=conn.metadata())
    events = list(stub.WatchPipeline(gw.WatchPipelineRequest(pipeline_id=p.id), metadata=conn.metadata()))
    final = events[-1].pipeline
    return {"spec": spec, "pipeline": final, "events": events, "first_id": p.id, "retried_id": again.id}


def test_pipeline_succeeds_with_progress(finished):
    p = finished["pipeline"]
    assert gw.PipelineState.Name(p.state) == "PIPELINE_STATE_SUCCEEDED", p.error.message
    names = {s.name for s in p.stages}
    assert {"finetune", "quantize/nf4", "benchmark/original", "select", "export", "report"} <= names
    # Progress streamed while it ran: some event saw a stage running part-way.
    assert any(
        s.state == common.OPERATION_STATE_RUNNING for e in finished["events"] for s in e.pipeline.stages
    )
    assert finished["retried_id"] == finished["first_id"], "same idempotency key must give the same pipeline"


def test_listing_views(finished, conn):
    stub = conn.gateway_stub()
    basic = stub.ListPipelines(gw.ListPipelinesRequest(), metadata=conn.metadata()).pipelines
    listed = next(p for p in basic if p.id == finished["pipeline"].id)
    assert listed.state == gw.PIPELINE_STATE_SUCCEEDED and listed.report.id
    assert not listed.stages and not listed.summary.fields  # the basic view stays small
    full = stub.ListPipelines(
        gw.ListPipelinesRequest(view=gw.PIPELINE_VIEW_FULL), metadata=conn.metadata()
    ).pipelines
    listed = next(p for p in full if p.id == finished["pipeline"].id)
    assert listed.stages and listed.summary.fields["recommended"].string_value


def test_accuracy_gate_rejects_without_failing_the_pipeline(finished):
    stages = {s.name: s for s in finished["pipeline"].stages}
    fp4 = stages["quantize/fp4"]
    assert fp4.state == common.OPERATION_STATE_REJECTED, fp4.error.message
    assert not fp4.results, "a rejected candidate must not be published"
    assert "accuracy gate rejected fp4" in fp4.error.message and "allowed: +1%" in fp4.error.message
    assert stages["benchmark/fp4"].state == common.OPERATION_STATE_SKIPPED
    summary = _struct(finished["pipeline"].summary)
    rejected = next(c for c in summary["candidates"] if c["name"] == "fp4")
    assert rejected["rejected_by"] == "accuracy gate" and not rejected["feasible"]
    assert rejected["metrics"]["perplexity_increase_pct"] > 1
    assert rejected["violations"][0]["metric"] == "perplexity_increase_pct"
    assert summary["recommended"] != "fp4"


def test_summary_has_every_candidate_measured(finished):
    summary = _struct(finished["pipeline"].summary)
    names = {c["name"] for c in summary["candidates"] if not c.get("rejected_by")}
    assert names == {"original", "bf16", "int8_dynamic", "nf4"}
    for c in summary["candidates"]:
        if c.get("rejected_by"):
            continue
        m = c["metrics"]
        for key in ("perplexity", "size_mb", "latency_ms_per_token", "peak_memory_mb"):
            assert m[key] > 0, (c["name"], key)
    by = {c["name"]: c["metrics"] for c in summary["candidates"]}
    assert by["nf4"]["size_mb"] < by["original"]["size_mb"]
    assert by["bf16"]["size_mb"] < by["original"]["size_mb"]
    assert 2.0 < by["original"]["perplexity"] < 8.0  # stories260K on TinyStories: about 4
    # Quantized candidates are compared with the model they came from (the fine-tuned one).
    for name in ("bf16", "int8_dynamic", "nf4"):
        assert 0 < by[name]["top1_agreement"] <= 1, name
        assert by[name]["kl_divergence"] >= 0, name
    assert "top1_agreement" not in by["original"]
    assert summary["recommended"] in names
    assert summary["rationale"]


def test_artifacts_lineage_and_manifests_on_s3(finished, stack, s3_server, conn):
    p = finished["pipeline"]
    stages = {s.name: s for s in p.stages}
    spec = finished["spec"]
    stub = conn.gateway_stub()

    def manifest(artifact_id):
        reply = stub.GetArtifact(gw.GetArtifactRequest(artifact_id=artifact_id), metadata=conn.metadata())
        return json.loads(reply.manifest_json)

    merged = stages["finetune"].results[0].id
    m = manifest(merged)
    assert m["parents"] == [spec["model"]["artifact"], spec["data"]["train"]["artifact"]]
    assert m["recipe"]["stage"] == "finetune"
    for method in ("bf16", "int8_dynamic", "nf4"):
        q = manifest(stages[f"quantize/{method}"].results[0].id)
        assert q["parents"] == [merged]
        assert q["recipe"]["method"] == method and "libraries" in q["recipe"]
        assert q["metrics"]["gate"] == "passed" and q["metrics"]["top1_agreement"] > 0.5
        assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in q["files"])
    export = manifest(stages["export"].results[0].id)
    assert export["kind"] == "export" and export["format"] == "onnx"
    assert export["recipe"]["method"] == "onnx-int8"  # the cpu-x86 target's default format
    assert _struct(p.summary)["export"]["format"] == "onnx-int8"
    assert any(f["path"].endswith(".onnx") for f in export["files"])
    # The bytes really are in the S3 bucket, under the configured prefix.
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    )
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=stack.prefix)["Contents"]}
    assert f"{stack.prefix}/artifacts/{merged}/manifest.json" in keys


def test_download_through_gateway_is_verified(finished, conn, tmp_path):
    report_id = finished["pipeline"].report.id
    files = download(conn, report_id, tmp_path / "report")
    names = {f.name for f in files}
    assert {"report.html", "report.json"} <= names
    reply = conn.gateway_stub().GetArtifact(
        gw.GetArtifactRequest(artifact_id=report_id), metadata=conn.metadata()
    )
    for entry in json.loads(reply.manifest_json)["files"]:
        assert sha256_file(tmp_path / "report" / entry["path"]) == entry["sha256"]


def test_health_and_metrics_endpoints(finished, stack):
    for service in ("gateway", *SERVICES):
        assert health_status(stack.address(service)) == "SERVING"
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port('quantizer')}/metrics").read().decode()
    )
    assert (
        'tailor_rpc_requests_total{code="OK",method="/tailor.quantizer.v1.QuantizerService/Quantize"' in text
    )
    assert "tailor_stage_duration_seconds_bucket" in text
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port('gateway')}/metrics").read().decode()
    assert "tailor_gateway_queue_depth" in text


TRACED_SERVICES = {
    "tailor-gateway",
    "tailor-trainer",
    "tailor-quantizer",
    "tailor-benchmarker",
    "tailor-exporter",
    "tailor-selector",
}


def _trace_of(path: Path, pipeline_id: str) -> tuple[list[dict], set[str]]:
    """The pipeline's root spans and the services in its trace, from the complete lines written so far."""
    text = path.read_text() if path.exists() else ""
    spans = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
    roots = [
        s for s in spans if s["attributes"].get("tailor.pipeline_id") == pipeline_id and not s["parent_id"]
    ]
    services = {s["service"] for s in spans if roots and s["trace_id"] == roots[0]["trace_id"]}
    return roots, services


def test_one_trace_spans_gateway_and_services(finished, stack):
    import time

    # Spans reach the file from each process's exporter thread (batched every 100 ms): give them a moment.
    for _ in range(60):
        roots, services = _trace_of(stack.state_dir / "traces.jsonl", finished["pipeline"].id)
        if len(roots) == 1 and TRACED_SERVICES <= services:
            break
        time.sleep(0.5)
    assert len(roots) == 1
    assert TRACED_SERVICES <= services


def test_bad_requests_get_the_right_status(finished, stack, conn):
    model_id = finished["spec"]["model"]["artifact"]
    # Workers take calls from the gateway only: an anonymous caller is refused before any work.
    anonymous = qgrpc.QuantizerServiceStub(grpc.insecure_channel(stack.address("quantizer")))
    with pytest.raises(grpc.RpcError) as err:
        anonymous.Quantize(qpb.QuantizeRequest(model=common.ArtifactRef(id=model_id), method="nf4"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    quantizer = qgrpc.QuantizerServiceStub(stack.worker_channel(stack.address("quantizer")))
    with pytest.raises(grpc.RpcError) as err:
        quantizer.Quantize(qpb.QuantizeRequest(model=common.ArtifactRef(id=model_id), method="bogus"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nf4" in err.value.details() and "int8_dynamic" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        quantizer.Quantize(qpb.QuantizeRequest(model=common.ArtifactRef(id="0" * 64), method="nf4"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        quantizer.Quantize(qpb.QuantizeRequest(model=common.ArtifactRef(id="../../etc"), method="nf4"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    stub = conn.gateway_stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.ListPipelines(gw.ListPipelinesRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.ListPipelines(gw.ListPipelinesRequest(), metadata=[("authorization", "Bearer wrong")])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    bad = {**finished["spec"], "quantize": [{"method": "nf4", "bits": 3}]}
    with pytest.raises(grpc.RpcError) as err:
        stub.CreatePipeline(gw.CreatePipelineRequest(spec_yaml=yaml.safe_dump(bad)), metadata=conn.metadata())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "quantize.0.bits" in err.value.details()
    missing = {**finished["spec"], "model": {"artifact": "f" * 64}}
    with pytest.raises(grpc.RpcError) as err:
        stub.CreatePipeline(
            gw.CreatePipelineRequest(spec_yaml=yaml.safe_dump(missing)), metadata=conn.metadata()
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.GetArtifact(gw.GetArtifactRequest(artifact_id="f" * 64), metadata=conn.metadata())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The workers are still healthy after all that.
    assert health_status(stack.address("quantizer")) == "SERVING"


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"finetune": {"method": "lora", "config": {"stepz": 3}}},
            "finetune.config.stepz: unknown setting (did you mean 'steps'?); valid settings:",
        ),
        ({"finetune": {"method": "lora", "config": {"steps": -1}}}, "finetune.config.steps: -1 is less than"),
        (
            {"quantize": [{"method": "rtn", "config": {"bits": 3}}]},
            "quantize.0.config.bits: 3 is not allowed; valid choices: 4, 8",
        ),
        (
            {"benchmark": {"config": {"threadz": 1}}},
            "benchmark.config.threadz: unknown setting (did you mean 'threads'?)",
        ),
        (
            {"export": {"format": "onnx", "config": {"opset": "x"}}},
            "export.config.opset: 'x' is not of type 'integer'",
        ),
    ],
    ids=["typo", "bound", "choice", "benchmark-typo", "type"],
)
def test_a_stage_config_is_checked_at_submit_against_the_workers_schema(finished, conn, change, message):
    """The workers publish each method's config schema; the gateway refuses a bad config before any stage
    runs (so a typo in the fine-tune's config is not found after the fine-tune)."""
    bad = {**finished["spec"], **change}
    before = len(
        conn.gateway_stub().ListPipelines(gw.ListPipelinesRequest(), metadata=conn.metadata()).pipelines
    )
    with pytest.raises(grpc.RpcError) as err:
        conn.gateway_stub().CreatePipeline(
            gw.CreatePipelineRequest(spec_yaml=yaml.safe_dump(bad)), metadata=conn.metadata()
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details(), err.value.details()
    after = len(
        conn.gateway_stub().ListPipelines(gw.ListPipelinesRequest(), metadata=conn.metadata()).pipelines
    )
    assert after == before  # nothing was created


def _struct(struct) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(struct)


def test_methods_describe_shows_the_schema_the_gateway_checks(finished, stack, capsys):
    from tailor_cli import main as cli

    assert cli.main(["--state-dir", str(stack.state_dir), "methods", "describe", "rtn"]) == 0
    out = capsys.readouterr().out
    assert "rtn (quantize method" in out and "config of rtn" in out
    assert "group_size" in out and "4 | 8" in out  # the key and its choices from the published schema
    assert cli.main(["--state-dir", str(stack.state_dir), "methods", "describe", "lora"]) == 0
    assert "gradient_accumulation_steps" in capsys.readouterr().out
    assert cli.main(["--state-dir", str(stack.state_dir), "methods", "describe", "bogus"]) == 2
    out = capsys.readouterr().out
    assert "no worker lists a method or format named 'bogus'" in out and "nf4" in out


def test_pipeline_validate_checks_everything_and_uploads_nothing(finished, stack, conn, tmp_path, capsys):
    from tailor_cli import main as cli

    examples = Path(__file__).resolve().parents[2] / "examples"
    spec = {
        **SHORT_SPEC,
        "model": {"path": str(examples / "models" / "stories260K")},
        "data": {
            "train": {"path": str(examples / "data" / "tinystories_train.txt")},
            "eval": {"path": "missing.txt"},
        },
    }
    stub = conn.gateway_stub()
    before = (
        len(stub.ListPipelines(gw.ListPipelinesRequest(), metadata=conn.metadata()).pipelines),
        len(stub.ListArtifacts(gw.ListArtifactsRequest(), metadata=conn.metadata()).artifacts),
    )
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    state = ["--state-dir", str(stack.state_dir)]
    assert cli.main([*state, "pipeline", "validate", str(path)]) == 2
    assert "data.eval.path: missing.txt does not exist" in capsys.readouterr().out

    spec["data"]["eval"] = {"path": str(examples / "data" / "tinystories_eval.txt")}
    path.write_text(yaml.safe_dump(spec))
    assert cli.main([*state, "pipeline", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid; pipeline quickstart-short would run" in out and "finetune" in out and "report" in out

    spec["finetune"] = {"method": "lora", "config": {"stepz": 4}}
    path.write_text(yaml.safe_dump(spec))
    for command in ("validate", "run"):  # `run` validates before it uploads
        assert cli.main([*state, "pipeline", command, str(path)]) == 2
        assert "finetune.config.stepz: unknown setting" in capsys.readouterr().out
    assert cli.main([*state, "pipeline", "validate", str(tmp_path / "nope.yaml")]) == 2
    assert "spec file" in capsys.readouterr().out
    after = (
        len(stub.ListPipelines(gw.ListPipelinesRequest(), metadata=conn.metadata()).pipelines),
        len(stub.ListArtifacts(gw.ListArtifactsRequest(), metadata=conn.metadata()).artifacts),
    )
    assert after == before  # nothing created, nothing uploaded


def test_a_unique_id_prefix_works_like_the_whole_id(finished, conn, tmp_path):
    stub, meta = conn.gateway_stub(), conn.metadata()
    pipeline = finished["pipeline"]
    assert (
        stub.GetPipeline(gw.GetPipelineRequest(pipeline_id=pipeline.id[:8]), metadata=meta).id == pipeline.id
    )
    events = list(stub.WatchPipeline(gw.WatchPipelineRequest(pipeline_id=pipeline.id[:10]), metadata=meta))
    assert events[-1].pipeline.id == pipeline.id
    report = pipeline.report.id
    got = stub.GetArtifact(gw.GetArtifactRequest(artifact_id=report[:12]), metadata=meta)
    assert got.artifact.id == report
    chunks = list(stub.DownloadArtifact(gw.DownloadArtifactRequest(artifact_id=report[:12]), metadata=meta))
    assert chunks
    for bad, code in (("abc", grpc.StatusCode.INVALID_ARGUMENT), ("0" * 8, grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetPipeline(gw.GetPipelineRequest(pipeline_id=bad), metadata=meta)
        assert err.value.code() == code, err.value.details()


def test_lists_print_json_with_whole_ids_and_tables_fit_80_columns(finished, stack, capsys, monkeypatch):
    from tailor_cli import main as cli

    state = ["--state-dir", str(stack.state_dir)]
    pipeline = finished["pipeline"]
    assert cli.main([*state, "pipeline", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert pipeline.id in {p["id"] for p in listed}
    assert cli.main([*state, "pipeline", "status", pipeline.id[:8], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == pipeline.id
    assert cli.main([*state, "artifacts", "ls", "--json"]) == 0
    artifacts = json.loads(capsys.readouterr().out)
    assert pipeline.report.id in {a["id"] for a in artifacts}
    assert {"id", "kind", "name", "format", "made_by", "bytes", "parents"} <= set(artifacts[0])
    assert cli.main([*state, "methods", "describe", "nf4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["config_schema"]["type"] == "object"

    monkeypatch.setattr(cli.console, "width", 80)
    for argv in (["pipeline", "list"], ["artifacts", "ls"]):
        assert cli.main([*state, *argv]) == 0
        out = capsys.readouterr().out
        assert max(len(line) for line in out.splitlines()) <= 80, out
        assert pipeline.id[:12] in out or pipeline.report.id[:12] in out  # short ids, whole enough to use
