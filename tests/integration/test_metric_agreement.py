"""On the real stack: the numbers of one pipeline agree wherever they are shown (issue 20, item 5).

A short pipeline (fine-tune, nf4 and fp4, a benchmark on its own tokens and windows): the accuracy
gate's perplexity is measured on the benchmark's tokens, so the gate's increase and the report's are
the same number; tokens/s is the same median as ms/token; the report says "slower" for a slower model.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from support.examples import upload_example_inputs

from tailor.gateway.v1 import gateway_service_pb2 as gw
from tailor.transfer import download
from tailor_cli.stack import Stack, free_base_port
from tailor_runtime.benchmark_report import SCHEMA_VERSION, BenchmarkReport, Environment

pytestmark = pytest.mark.integration

SPEC = {
    "apiVersion": "tailor.dev/v1",
    "kind": "Pipeline",
    "name": "metric-agreement",
    "finetune": {"method": "lora", "config": {"steps": 4, "batch_size": 4, "seq_len": 64}},
    "quantize": [
        {"method": "nf4", "gate": {"max_perplexity_increase_pct": 50}},  # passes: benchmarked too
        {"method": "fp4", "gate": {"max_perplexity_increase_pct": 1}},  # refused by the gate
    ],
    # Not the gate's defaults: the gateway must send these to the gate.
    "benchmark": {
        "config": {
            "max_eval_tokens": 1024,
            "context_length": 128,
            "stride": 64,
            "latency_new_tokens": 8,
            "warmup": 0,
            "repetitions": 1,
            "threads": 1,
        }
    },
    "select": {"constraints": {"max_perplexity_increase_pct": 5}},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("stack"), base_port=free_base_port())
    stack.start(timeout=240)
    try:
        conn = stack.connection()
        stub = conn.gateway_stub()
        spec = {**SPEC, **upload_example_inputs(conn)}
        p = stub.CreatePipeline(
            gw.CreatePipelineRequest(spec_yaml=yaml.safe_dump(spec)), metadata=conn.metadata()
        )
        events = list(stub.WatchPipeline(gw.WatchPipelineRequest(pipeline_id=p.id), metadata=conn.metadata()))
        final = events[-1].pipeline
        files = {f.name: f for f in download(conn, final.report.id, tmp_path_factory.mktemp("r") / "report")}
        summary = json.loads(files["report.json"].read_text())
        rows = {c["name"]: c for c in summary["candidates"]}
        # What the gate measured for nf4 (in its manifest) and what the benchmark of the baseline did.
        manifest = stub.GetArtifact(
            gw.GetArtifactRequest(artifact_id=rows["nf4"]["artifact_id"]), metadata=conn.metadata()
        ).manifest_json
        bench = download(conn, rows["original"]["report_id"], tmp_path_factory.mktemp("b") / "bench")
        yield {
            "pipeline": final,
            "summary": summary,
            "rows": rows,
            "page": files["report.html"].read_text(),
            "gate_nf4": json.loads(manifest)["metrics"],
            "bench_original": json.loads(next(f for f in bench if f.name == "report.json").read_text()),
        }
    finally:
        stack.stop()


def test_the_gate_and_the_benchmark_measure_the_same_tokens(finished):
    pipeline, rows, page = finished["pipeline"], finished["rows"], finished["page"]
    assert gw.PipelineState.Name(pipeline.state) == "PIPELINE_STATE_SUCCEEDED", pipeline.error.message
    baseline = rows["original"]["metrics"]["perplexity"]
    # nf4 passed the gate and was benchmarked: the gate's increase is the table's.
    gate_nf4 = finished["gate_nf4"]
    assert gate_nf4["gate_tokens_scored"] == finished["bench_original"]["perplexity"]["tokens_scored"]
    assert (gate_nf4["gate_context_length"], gate_nf4["gate_stride"]) == (128, 64)
    assert gate_nf4["parent_perplexity"] == pytest.approx(baseline, rel=1e-6)
    assert gate_nf4["perplexity_increase_pct"] == pytest.approx(
        rows["nf4"]["metrics"]["perplexity_increase_pct"], rel=1e-4
    )
    # fp4 was refused: its row carries the gate's baseline, which is the table's.
    fp4 = rows["fp4"]
    assert fp4["rejected_by"] == "accuracy gate"
    assert fp4["gate"]["parent_perplexity"] == pytest.approx(baseline, rel=1e-6)
    assert "not the baseline row" not in page and "gate, same tokens as the benchmark" in page


def test_speed_numbers_are_one_median_and_ratios_never_invert(finished):
    page = finished["page"]
    for c in finished["summary"]["candidates"]:
        m = c["metrics"]
        if "latency_ms_per_token" in m:
            assert m["tokens_per_s"] == pytest.approx(1000 / m["latency_ms_per_token"], rel=1e-9)
    assert not re.search(r"\b0\.\d+x (faster|slower|smaller|larger)", page)
    footer = re.search(r"<footer>.*?</footer>", page, re.S)[0]
    assert "an unnamed machine" not in footer and "{" not in footer and " cores" in footer


def test_the_stored_benchmark_report_is_the_typed_contract(finished):
    """The benchmarker's stored report.json parses as a BenchmarkReport, names the model it measured, and
    its environment is the one the pipeline's report shows."""
    report = BenchmarkReport.parse(finished["bench_original"], "the original's report.json")
    assert report.schema_version == SCHEMA_VERSION and report.dump() == finished["bench_original"]
    assert report.model_id == finished["rows"]["original"]["artifact_id"]
    assert report.headline()["perplexity"] == pytest.approx(
        finished["rows"]["original"]["metrics"]["perplexity"]
    )
    assert Environment.parse(finished["summary"]["environment"]).hostname == report.environment.hostname != ""
