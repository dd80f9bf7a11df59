"""The metric catalogue: every number the benchmarker emits is in it, and its readers follow it."""

from __future__ import annotations

import pytest

from tailor_benchmarker.config import BenchmarkConfig
from tailor_benchmarker.metrics import headline_metrics
from tailor_runtime import metrics_catalogue as mc
from tailor_selector.reports import parse_objective
from tailor_selector.selection import DEFAULT_OBJECTIVES, Candidate, Objective, select


def _full_result() -> dict:
    """A benchmark result with every optional measurement (reference, choices, generation, batches)."""
    per_token = {"median": 2.6, "p95": 3.1, "p99": 9.0}
    return {
        "perplexity": {"perplexity": 4.2, "tokens_scored": 8191},
        "latency": {
            "ms_per_token": 2.6,
            # The median run's rate: runs with a slow step make it lower than 1000 / median step.
            "tokens_per_s": 145.0,
            "per_token_ms": per_token,
            "ttft_ms": {"median": 5.0},
            "pipelined_tokens_per_s": 900.0,
            "throughput": {"1": {"tokens_per_s": 145.0}, "4": {"tokens_per_s": 520.0}},
        },
        "memory": {"peak_rss_mb": 700.0, "gpu_peak_allocated_mb": 40.0},
        "model_memory_mb": 1.0,
        "size_on_disk_mb": 1.1,
        "agreement": {"top1_agreement": 0.97, "kl_divergence": 0.01},
        "multiple_choice": {"accuracy": 0.6},
        "generation": {"exact_match": 0.1, "bleu": 0.2, "rouge_l": 0.3},
        "environment": {"hostname": "box"},
    }


def test_every_metric_the_benchmarker_emits_has_an_entry():
    emitted = headline_metrics(_full_result())
    missing = [k for k in emitted if k not in mc.CONTEXT_KEYS and mc.lookup(k) is None]
    assert not missing
    assert {"tokens_per_s_batch_4", "latency_p99_ms", "choice_accuracy", "rouge_l"} <= set(emitted)
    for name in emitted:
        entry = mc.lookup(name)
        if entry is not None:
            assert entry.label and entry.aggregation and entry.better in (mc.LOWER, mc.HIGHER, None)
    assert mc.lookup("no_such_metric") is None and mc.lookup("tokens_per_s_batch_x") is None


def test_every_roofline_estimate_has_an_entry():
    from tailor_runtime.roofline import estimate_for_target, get_profile

    estimates = estimate_for_target(get_profile("raspberry-pi-5"), headline_metrics(_full_result()))
    assert [k for k in estimates if mc.lookup(k) is None] == []


def test_tokens_per_s_is_the_same_median_as_ms_per_token():
    emitted = headline_metrics(_full_result())
    # 2.6 ms/token beside 145 tokens/s was a median beside a run mean; now one is 1000 / the other.
    assert emitted["tokens_per_s"] == pytest.approx(1000 / 2.6)
    assert "median" in mc.label("latency_ms_per_token").lower()
    assert "median" in mc.label("tokens_per_s").lower()


def test_memory_is_labelled_by_what_was_measured():
    gpu = headline_metrics(_full_result())
    assert gpu["device"] == "cuda" and gpu["peak_memory_mb"] == 40.0
    assert mc.memory_label(gpu["device"]) == "Peak GPU memory (allocated)"
    assert "RSS" not in mc.memory_label("cuda") and mc.memory_label("cpu") == "Peak RSS"
    assert mc.memory_label_for({"cuda", "cpu"}) == "Peak memory (GPU allocated or RSS)"


def test_selector_directions_come_from_the_catalogue():
    for objective in DEFAULT_OBJECTIVES:
        assert objective.maximize == mc.higher_is_better(objective.metric)
    assert parse_objective("tokens_per_s").maximize and not parse_objective("latency_ms_per_token").maximize
    assert parse_objective("top1_agreement:2").maximize
    assert not parse_objective("tokens_per_s:1:min").maximize  # an explicit direction still wins
    assert Objective.of("choice_accuracy").maximize and not Objective.of("size_mb").maximize


def test_the_selector_service_maximizes_throughput_even_when_the_proto_leaves_it_unset():
    import asyncio

    from tailor.selector.v1 import selector_service_pb2 as pb
    from tailor_selector.servicer import SelectorServicer

    request = pb.SelectRequest(
        candidates=[
            pb.Candidate(id="slow", metrics={"tokens_per_s": 100.0}, is_baseline=True),
            pb.Candidate(id="fast", metrics={"tokens_per_s": 300.0}),
        ],
        objectives=[pb.Objective(metric="tokens_per_s")],  # maximize left at proto3's False
    )
    response = asyncio.run(SelectorServicer().Select(request, None))
    assert response.recommended_id == "fast"


@pytest.mark.parametrize(
    ("metric", "value", "baseline", "words"),
    [
        ("latency_ms_per_token", 1.28, 1.0, "1.28x slower"),
        ("latency_ms_per_token", 1.0, 1.28, "1.28x faster"),
        ("tokens_per_s", 100.0, 128.0, "1.28x slower"),
        ("tokens_per_s", 128.0, 100.0, "1.28x faster"),
        ("size_mb", 1.0, 3.4, "3.40x smaller"),
        ("size_mb", 2.0, 1.0, "2.00x larger"),
        ("latency_ms_per_token", 1.001, 1.0, "1.00x (same speed)"),
    ],
)
def test_ratio_wording_reads_right_both_ways(metric, value, baseline, words):
    assert mc.ratio_text(metric, value, baseline) == words


def test_ratio_wording_refuses_what_it_cannot_say():
    assert mc.ratio_text("latency_ms_per_token", 0.0, 1.0) is None
    assert mc.ratio_text("latency_ms_per_token", None, 1.0) is None
    assert mc.ratio_text("perplexity", 4.0, 3.0) is None  # a percentage says it, not a speed ratio


def test_the_selectors_rationale_says_slower_not_a_ratio_below_one():
    base = Candidate("base", "base", {"perplexity": 4.0, "size_mb": 4.0, "latency_ms_per_token": 1.0}, True)
    small = Candidate("small", "small", {"perplexity": 4.01, "size_mb": 1.0, "latency_ms_per_token": 1.28})
    rationale = select([base, small], [], [Objective.of("size_mb")]).rationale
    assert "4.00x smaller, 1.28x slower" in rationale


def test_benchmark_and_gate_share_the_perplexity_protocol():
    from tailor_quantizer.gate import GateSettings

    cfg, gate = BenchmarkConfig(), GateSettings()
    assert (cfg.max_eval_tokens, cfg.context_length, cfg.stride) == (
        gate.eval_tokens,
        gate.context_length,
        gate.stride,
    )
