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
