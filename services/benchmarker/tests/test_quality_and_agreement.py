"""Agreement with the parent, multiple choice, generation metrics and batch throughput, on stories260K."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tailor_benchmarker.config import BenchmarkConfig
from tailor_benchmarker.latency import decode_latency
from tailor_benchmarker.metrics import headline_metrics
from tailor_benchmarker.run import run_benchmark
from tailor_benchmarker.tasks import generation, multiple_choice, read_sst2
from tailor_runtime.ml.agreement import agreement
from tailor_runtime.ml.model_io import load_causal_lm
from tailor_runtime.ml.perplexity import encode_eval_text, perplexity

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples/models/stories260K"
EVAL = REPO / "examples/data/tinystories_eval.txt"
SST2 = Path("/work/shared/data/eval/sst2/sst2_dev.tsv")
if not SST2.is_file():
    SST2 = REPO.parent / "shared/data/eval/sst2/sst2_dev.tsv"


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return load_causal_lm(MODEL)


@pytest.fixture(scope="module")
def text() -> str:
    return EVAL.read_text(encoding="utf-8")


def _noisy_copy(model):
    """The model with its weights rounded to bfloat16: a small, real quantization error."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return other


def test_a_model_agrees_fully_with_itself(lm, text):
    model, tokenizer = lm
    result = agreement(model, model, tokenizer, text, context_length=64, stride=32, max_tokens=300)
    assert result["top1_agreement"] == 1.0 and result["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    # The positions perplexity scores: every token but BOS.
    scored = perplexity(model, tokenizer, text, context_length=64, stride=32, max_tokens=300)["tokens_scored"]
    assert result["positions"] == scored


def test_agreement_equals_hand_computed_kl_and_top1(lm, text):
    model, tokenizer = lm
    noisy = _noisy_copy(model)
    result = agreement(noisy, model, tokenizer, text, context_length=64, stride=64, max_tokens=256)

    # Independent reference: non-overlapping chunks, torch's kl_div, the first token of a chunk unscored.
    ids, _ = encode_eval_text(tokenizer, text, 256)
    kls, same = [], 0
    for start in range(0, len(ids), 64):
        chunk = torch.tensor([ids[start : start + 64]])
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk).logits[0].double(), -1)[:-1]
            logq = torch.log_softmax(noisy(chunk).logits[0].double(), -1)[:-1]
        keep = chunk[0, 1:] != tokenizer.bos_token_id
        kl = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
        kls += kl[keep].tolist()
        same += int((logp.argmax(-1) == logq.argmax(-1))[keep].sum())
    assert result["positions"] == len(kls)
    assert result["kl_divergence"] == pytest.approx(sum(kls) / len(kls), rel=1e-9)
    assert result["top1_agreement"] == same / len(kls)
    assert 0.9 < result["top1_agreement"] < 1.0 and 0 < result["kl_divergence"] < 0.05


def test_multiple_choice_scores_the_continuation_tokens(lm):
    model, tokenizer = lm
    examples = read_sst2(SST2, 6)
    assert len(examples) == 6 and examples[0][1] == [" negative", " positive"]
    result = multiple_choice(model, tokenizer, examples)
    assert result["examples"] == 6 and result["chance"] == 0.5
    assert 0.0 <= result["accuracy"] <= 1.0
    # A model that always prefers label 1 and one that always prefers label 0 cover every example.
    labels = [label for _, _, label in examples]
    forced = [(ctx, ["x", "y"], label) for ctx, _, label in examples]
    assert 0 <= multiple_choice(model, tokenizer, forced)["accuracy"] <= 1.0
    assert sorted(set(labels)) == [0, 1]


def test_generation_of_the_models_own_continuation_is_an_exact_match(lm):
    model, tokenizer = lm
    # A document the model continues greedily exactly as written: its own greedy output.
    sample = decode_latency(model, tokenizer, prompt="Once upon a time", new_tokens=40, warmup=0)["sample"]
    exact = generation(model, tokenizer, sample, examples=1, prompt_tokens=16, new_tokens=12)
    assert exact["exact_match"] == 1.0 and exact["bleu"] == pytest.approx(100.0)
    assert exact["rouge_l"] == pytest.approx(1.0)


def test_latency_reports_spread_percentiles_and_batch_throughput(lm):
    model, tokenizer = lm
    lat = decode_latency(model, tokenizer, new_tokens=6, warmup=0, repetitions=2, batch_sizes=(1, 3))
    per_token = lat["per_token_ms"]
    assert per_token["count"] == 10 and per_token["stdev"] >= 0 and per_token["iqr"] >= 0
    assert per_token["p50"] <= per_token["p95"] <= per_token["p99"] <= per_token["max"]
    assert set(lat["throughput"]) == {"1", "3"} and lat["throughput"]["3"]["batch_size"] == 3
    assert lat["throughput"]["1"]["tokens_per_s"] == pytest.approx(lat["tokens_per_s"])


def test_tasks_are_off_by_default():
    cfg = BenchmarkConfig()
    assert cfg.generation_examples == 0 and cfg.batch_sizes == (1, 4)


@pytest.mark.slow
def test_child_measures_agreement_and_tasks_and_headlines_them():
    cfg = BenchmarkConfig(max_eval_tokens=256, context_length=64, stride=32, latency_new_tokens=4, warmup=0,
                          repetitions=1, threads=1, batch_sizes=[1, 2], agreement_max_tokens=256,
                          choice_max_examples=4, generation_examples=2, generation_new_tokens=4)  # fmt: skip
    result = run_benchmark(MODEL, EVAL, cfg, lambda *a, **k: None, reference_dir=MODEL, choice_file=SST2)
    result["size_on_disk_mb"] = result.get("size_on_disk_mb", 1.0)
    metrics = headline_metrics(result)
    assert metrics["top1_agreement"] == 1.0 and metrics["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert result["agreement"]["reference"]["format"] == "hf-safetensors"
    assert 0 <= metrics["choice_accuracy"] <= 1 and result["multiple_choice"]["examples"] == 4
    assert {"exact_match", "bleu", "rouge_l", "ttft_ms", "latency_p95_ms", "latency_p99_ms"} <= set(metrics)
    assert metrics["tokens_per_s_batch_2"] > 0
    assert metrics["device"] == "cpu" and metrics["peak_memory_mb"] == metrics["peak_rss_mb"] > 0
    assert "tokens_per_s_pipelined" not in metrics  # a dynamic cache on CPU: no second, unwaited decode
    # The memory figures are the model's alone: read before the reference was loaded.
    assert result["memory"]["peak_rss_mb"] > 0
