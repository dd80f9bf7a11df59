"""A realistic pipeline summary (the shape gateway/tailor_gateway/reporting.py builds) for report tests."""

from __future__ import annotations

import copy
from typing import Any

from support.benchmark_sample import sample_environment

_ID = "0123456789abcdef" * 4

_SUMMARY: dict[str, Any] = {
    "pipeline": {"id": "pl-7f3a9c", "name": "tinyllama-edge <cpu>", "created": "2026-11-24T23:51:00Z"},
    "baseline": "original",
    "constraints": [
        {"metric": "peak_memory_mb", "comparison": "at_most", "value": 1024.0},
        {"metric": "perplexity_increase_pct", "comparison": "at_most", "value": 5.0},
    ],
    "objectives": [
        {"metric": "size_mb", "maximize": False, "weight": 1.0},
        {"metric": "latency_ms_per_token", "maximize": False, "weight": 2.0},
        {"metric": "perplexity", "maximize": False, "weight": 1.0},
    ],
    "candidates": [
        {
            "name": "original",
            "method": "fp32",
            "metrics": {
                "perplexity": 3.912,
                "perplexity_increase_pct": 0.0,
                "size_mb": 1.05,
                "latency_ms_per_token": 0.91,
                "peak_memory_mb": 420.0,
                "tokens_per_s": 1099.0,
                "model_memory_mb": 1.0,
            },
            "feasible": True,
            "pareto_optimal": True,
            "violations": [],
        },
        {
            "name": "fp16",
            "method": "half",
            "metrics": {
                "perplexity": 3.913,
                "perplexity_increase_pct": 0.03,
                "size_mb": 0.53,
                "latency_ms_per_token": 1.32,
                "peak_memory_mb": 398.0,
                "tokens_per_s": 757.0,
            },
            "feasible": True,
            "pareto_optimal": False,
            "violations": [],
        },
        {
            "name": "int8_dynamic",
            "method": "int8_dynamic",
            "metrics": {
                "perplexity": 3.951,
                "perplexity_increase_pct": 1.0,
                "size_mb": 0.31,
                "latency_ms_per_token": 0.52,
                "peak_memory_mb": 380.0,
                "tokens_per_s": 1923.0,
            },
            "feasible": True,
            "pareto_optimal": True,
            "violations": [],
        },
        {
            "name": "nf4",
            "method": "bnb_nf4",
            "metrics": {
                "perplexity": 4.162,
                "perplexity_increase_pct": 6.39,
                "size_mb": 0.19,
                "latency_ms_per_token": 1.85,
                "peak_memory_mb": 402.0,
                "tokens_per_s": 540.0,
            },
            "feasible": False,
            "pareto_optimal": True,
            "violations": [
                {"metric": "perplexity_increase_pct", "limit": 5.0, "actual": 6.39, "excess": 1.39}
            ],
        },
        {
            "name": "int4_gptq",
            "method": "gptq",
            "metrics": {
                "perplexity": 4.05,
                "perplexity_increase_pct": 3.53,
                "size_mb": 0.22,
                "latency_ms_per_token": 0.77,
                "peak_memory_mb": 1530.0,
                "tokens_per_s": 1298.0,
            },
            "feasible": False,
            "pareto_optimal": True,
            "violations": [{"metric": "peak_memory_mb", "limit": 1024.0, "actual": 1530.0, "excess": 506.0}],
        },
        {
            "name": "int2_rtn",
            "method": "rtn <script>alert(1)</script>",
            "metrics": {
                "perplexity": 4.61,
                "perplexity_increase_pct": 17.84,
                "size_mb": 0.12,
                "latency_ms_per_token": 0.69,
                "peak_memory_mb": 1210.0,
                "tokens_per_s": 1449.0,
            },
            "feasible": False,
            "pareto_optimal": False,
            "violations": [
                {"metric": "perplexity_increase_pct", "limit": 5.0, "actual": 17.84, "excess": 12.84},
                {"metric": "peak_memory_mb", "limit": 1024.0, "actual": 1210.0, "excess": 186.0},
            ],
        },
    ],
    "recommended": "int8_dynamic",
    "rationale": (
        "int8_dynamic meets every constraint and has the best weighted score: 3.4x smaller and 1.75x "
        "faster than the original for +1.0% perplexity."
    ),
    "export": {"format": "onnx", "artifact_id": _ID[::-1], "max_abs_diff": 1.2e-5, "top1_agreement": 1.0},
}


def sample_summary() -> dict[str, Any]:
    """A fresh copy, so a test can change it freely."""
    summary = copy.deepcopy(_SUMMARY)
    # The block the benchmarker writes, built from its typed contract (tailor_runtime.benchmark_report).
    summary["environment"] = sample_environment().model_dump(exclude_unset=True)
    for index, cand in enumerate(summary["candidates"]):
        cand["artifact_id"] = f"{index:x}" + _ID[1:]
    return summary
