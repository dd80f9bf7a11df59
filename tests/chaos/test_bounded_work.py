"""Bounded work: configs that would run for ever are refused up front, and measurements that are not
finite (a model with NaN weights) become a rejected candidate instead of failing the pipeline."""

from __future__ import annotations

import math

import pytest
from google.protobuf import struct_pb2

from tailor_benchmarker.config import BenchmarkConfig
from tailor_gateway.engine import finite_only, non_finite, struct_to_dict
from tailor_runtime.errors import InvalidArgument
from tailor_runtime.stage import config_from_struct


def test_benchmark_repetitions_are_bounded_with_a_clear_message():
    struct = struct_pb2.Struct()
    struct.update({"repetitions": 1e9})
    with pytest.raises(InvalidArgument) as err:
        config_from_struct(BenchmarkConfig, struct, "benchmark")
    assert "repetitions" in err.value.message and "1000" in err.value.message
    struct.update({"repetitions": 5})
    assert config_from_struct(BenchmarkConfig, struct, "benchmark").repetitions == 5


def test_nan_metrics_are_read_and_named_not_a_value_error():
    struct = struct_pb2.Struct()
    struct.update({"perplexity": math.nan, "size_mb": 1.5, "latency": {"p50_ms": math.inf}})
    metrics = struct_to_dict(struct)  # json_format.MessageToDict raises ValueError here
    assert sorted(non_finite(metrics)) == ["latency.p50_ms=inf", "perplexity=nan"]
    assert finite_only(metrics) == {"size_mb": 1.5, "latency": {}}


def test_a_nan_rejected_candidate_is_reported_with_its_reason_and_the_others_selected(tmp_path):
    import time

    import yaml

    from tailor_gateway import state as st
    from tailor_gateway.reporting import build_summary
    from tailor_gateway.spec import parse_spec, plan

    spec_yaml = yaml.safe_dump(
        {
            "name": "nan",
            "model": {"artifact": "a" * 64},
            "data": {"eval": {"artifact": "b" * 64}},
            "quantize": [{"method": "bf16"}, {"method": "nf4"}],
        }
    )
    spec = parse_spec(spec_yaml)
    now = time.time()
    p = st.PipelineRow("p-nan", "proj", "nan", spec_yaml, st.RUNNING, now, now)
    stages = {}
    for i, s in enumerate(plan(spec)):
        stages[s.name] = st.StageRow(p.id, s.name, s.kind, i, s.depends_on, s.params, state=st.SUCCEEDED)
    for name in ("bf16", "nf4"):
        stages[f"quantize/{name}"].results = [{"id": name * 8}]
    for name in ("original", "bf16", "nf4"):
        stages[f"benchmark/{name}"].results = [{"id": "r" + name}]
        stages[f"benchmark/{name}"].metrics = {"perplexity": 4.0}
    stages["benchmark/nf4"].state = st.REJECTED
    stages["benchmark/nf4"].error_message = "measured values that are not finite (perplexity=nan)"
    stages["benchmark/nf4"].metrics = {"size_mb": 1.0}
    stages["select"].metrics = {"recommended_id": "bf16", "verdicts": []}
    summary = build_summary(p, spec, stages)
    by_name = {c["name"]: c for c in summary["candidates"]}
    assert set(by_name) == {"original", "bf16", "nf4"}
    assert by_name["nf4"]["rejected_by"] == "benchmark" and "not finite" in by_name["nf4"]["rejection"]
    assert summary["recommended"] == "bf16"


def test_a_config_that_disagrees_with_the_weights_is_refused_before_loading(tmp_path):
    import json
    import shutil
    from pathlib import Path

    from tailor_runtime.ml.model_io import check_config_against_weights, read_format

    source = Path(__file__).resolve().parents[2] / "examples" / "models" / "stories260K"
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    fmt = read_format(folder)
    check_config_against_weights(folder, fmt)  # the real model agrees with itself
    config = json.loads((folder / "config.json").read_text())
    for key, value, named in (
        ("num_hidden_layers", 60_000, "num_hidden_layers is 60000"),
        ("vocab_size", config["vocab_size"] * 1000, "vocab_size"),
        ("hidden_size", config["hidden_size"] * 64, "hidden_size"),
        ("max_position_embeddings", 1 << 30, "max_position_embeddings"),
    ):
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(InvalidArgument, match=named):
            check_config_against_weights(folder, fmt)


@pytest.mark.slow
def test_weights_cut_short_are_invalid_argument_at_load_without_the_worker_path(tmp_path):
    # V4: a lying safetensors file that reaches a worker was "internal error (SafetensorError)".
    import shutil
    from pathlib import Path

    from tailor_runtime.ml.model_io import load_causal_lm

    source = Path(__file__).resolve().parents[2] / "examples" / "models" / "stories260K"
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])  # header intact, the last tensors' bytes missing
    with pytest.raises(InvalidArgument, match="safetensors weights cannot be read") as info:
        load_causal_lm(folder)
    assert str(tmp_path) not in info.value.message


@pytest.mark.integration
def test_a_stopped_measuring_child_is_detected_by_its_missing_heartbeat(tmp_path, monkeypatch):
    import subprocess
    import sys

    from tailor_benchmarker import run

    monkeypatch.setattr(run, "STALL_S", 1.5)
    # A child that beats twice, then stops itself (SIGSTOP) as a frozen process would.
    code = "import os, signal, time; print('@heartbeat', flush=True); time.sleep(0.3); os.kill(os.getpid(), signal.SIGSTOP)"
    with (tmp_path / "stderr").open("wb") as stderr, pytest.raises(run.ChildStalled, match="heartbeat"):
        run._follow([sys.executable, "-c", code], stderr, lambda *a: None)
    # Every line the child sends is a heartbeat: it moves the stall clock on (checked without timing, so a
    # loaded machine cannot fail it), and a child that beats and ends is not killed.
    latest = {"beat": float("-inf")}
    run._read_progress(iter(["@heartbeat\n"]), latest)
    assert latest["beat"] > float("-inf")
    monkeypatch.setattr(run, "STALL_S", 600.0)
    code = "print('@heartbeat', flush=True)"
    with (tmp_path / "stderr").open("wb") as stderr:
        assert run._follow([sys.executable, "-c", code], stderr, lambda *a: None) == 0
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0
