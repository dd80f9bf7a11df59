"""Benchmarker measurements on the bundled real model (stories260K) and real text (TinyStories)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tailor_benchmarker.config import BenchmarkConfig
from tailor_benchmarker.latency import decode_latency
from tailor_benchmarker.run import run_benchmark
from tailor_runtime.benchmark_report import SCHEMA_VERSION, BenchmarkReport
from tailor_runtime.errors import Cancelled, FailedPrecondition, InvalidArgument
from tailor_runtime.ml.model_io import load_causal_lm
from tailor_runtime.ml.perplexity import encode_eval_text, perplexity, window_spans

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples/models/stories260K"
EVAL = REPO / "examples/data/tinystories_eval.txt"
# The box running the tests may be small and busy; one thread is both faster and steadier there.
FAST = dict(
    max_eval_tokens=512,
    context_length=64,
    stride=32,
    latency_new_tokens=6,
    warmup=0,
    repetitions=1,
    threads=1,
)


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return load_causal_lm(MODEL)


@pytest.fixture(scope="module")
def text() -> str:
    return EVAL.read_text(encoding="utf-8")


@pytest.mark.parametrize("n, context, stride", [(1000, 64, 32), (1000, 64, 64), (130, 64, 48), (5, 64, 32)])
def test_windows_score_each_token_once(n, context, stride):
    scored = []
    for begin, first, end in window_spans(n, context, stride):
        assert end - begin <= context and begin < first
        scored += range(first, end)
    assert len(scored) == len(set(scored))
    if stride < context:  # every token but the very first
        assert scored == list(range(1, n))
    else:  # non-overlapping: the first token of each window has no context and is not scored
        assert sorted(set(range(n)) - set(scored)) == list(range(0, n, context))


def test_non_overlapping_perplexity_equals_hand_computed_chunks(lm, text):
    model, tokenizer = lm
    result = perplexity(model, tokenizer, text, context_length=64, stride=64, max_tokens=300)

    # Independent reference: plain chunks, log_softmax by hand, BOS never a target.
    ids, _ = encode_eval_text(tokenizer, text, 300)
    nll, count = 0.0, 0
    for start in range(0, len(ids), 64):
        chunk = torch.tensor([ids[start : start + 64]])
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk).logits[0].double(), dim=-1)
        for pos in range(1, chunk.shape[1]):
            if chunk[0, pos] != tokenizer.bos_token_id:
                nll -= logp[pos - 1, chunk[0, pos]].item()
                count += 1
    assert result["tokens_scored"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_overlapping_windows_do_not_raise_perplexity_on_real_text(lm, text):
    model, tokenizer = lm
    sliding = perplexity(model, tokenizer, text, context_length=64, stride=16, max_tokens=1024)
    chunks = perplexity(model, tokenizer, text, context_length=64, stride=64, max_tokens=1024)
    assert sliding["perplexity"] <= chunks["perplexity"]
    # stories260K on in-domain text: karpathy reports 3.66 on its own validation split.
    assert 2.5 < sliding["perplexity"] < 8


def test_perplexity_of_a_logits_callable_equals_the_module(lm, text):
    model, tokenizer = lm
    as_module = perplexity(model, tokenizer, text, context_length=32, stride=16, max_tokens=128)
    as_callable = perplexity(lambda ids: model(input_ids=ids).logits, tokenizer, text, 32, 16, 128)
    assert as_callable["perplexity"] == pytest.approx(as_module["perplexity"], rel=1e-6)


def test_perplexity_rejects_a_context_longer_than_the_model(lm, text):
    with pytest.raises(InvalidArgument, match="exceeds the model's context"):
        perplexity(*lm, text, context_length=1024, stride=512)


def test_kv_cache_decoding_matches_full_recompute(lm):
    model, tokenizer = lm
    cached = decode_latency(model, tokenizer, new_tokens=12, warmup=1, repetitions=2)
    recomputed = decode_latency(
        lambda ids: model(input_ids=ids).logits, tokenizer, new_tokens=12, repetitions=1
    )
    assert cached["sample"] == recomputed["sample"]
    assert cached["sample"].startswith("Once upon a time, there was a little girl named Lily")
    assert cached["kv_cache"] and not recomputed["kv_cache"]
    assert cached["repetitions"] == 2 and cached["new_tokens"] == 12
    assert 0 < cached["per_token_ms"]["p50"] <= cached["per_token_ms"]["p95"] <= cached["per_token_ms"]["max"]
    assert cached["tokens_per_s"] > 0 and cached["ttft_ms"]["median"] > 0


def test_static_cache_decoding_matches_the_dynamic_cache(lm):
    """The GPU decode path (static KV cache; compiled there) runs on CPU too: same greedy tokens, at
    batch 1 and batch 2, one decoder reused over the warm-up and timed runs."""
    model, tokenizer = lm
    dynamic = decode_latency(model, tokenizer, new_tokens=10, warmup=0, repetitions=1)
    static = decode_latency(
        model, tokenizer, new_tokens=10, warmup=1, repetitions=2, batch_sizes=(1, 2), static_cache=True
    )
    assert static["sample"] == dynamic["sample"]
    assert (static["kv_cache_kind"], dynamic["kv_cache_kind"], static["compiled"]) == (
        "static",
        "dynamic",
        False,
    )
    assert static["throughput"]["2"]["tokens_per_s"] > 0
    assert static["pipelined_tokens_per_s"] > 0 and static["throughput"]["2"]["pipelined_tokens_per_s"] > 0
    assert "pipelined_tokens_per_s" not in dynamic
    with pytest.raises(InvalidArgument, match="compile needs static_cache"):
        decode_latency(model, tokenizer, new_tokens=4, compile=True)


@pytest.mark.parametrize("fmt, runtime", [("onnx", "ONNX Runtime"), ("gguf", "llama.cpp")])
def test_a_static_cache_for_a_runtime_with_its_own_cache_is_refused_before_loading(tmp_path, fmt, runtime):
    from tailor_benchmarker.child import measure
    from tailor_runtime.ml.model_io import write_format

    write_format(tmp_path, fmt)  # no weights: the refusal must come before any loading
    with pytest.raises(InvalidArgument, match=f"runs in {runtime}, which keeps its own cache"):
        measure(tmp_path, EVAL, BenchmarkConfig(**FAST, static_cache=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a worker without a GPU")
def test_cuda_without_a_gpu_or_for_a_cpu_format_is_refused_with_the_reason():
    from tailor_benchmarker.child import resolve_device

    assert resolve_device("auto", "hf-safetensors") == "cpu"  # no GPU here: auto stays on CPU
    assert resolve_device("auto", "onnx") == resolve_device("cpu", "hf-safetensors") == "cpu"
    with pytest.raises(FailedPrecondition, match="no CUDA GPU.*use device 'auto' or 'cpu'"):
        resolve_device("cuda", "hf-safetensors")
    with pytest.raises(ValueError, match="compile needs static_cache"):
        BenchmarkConfig(static_cache=False, compile=True)
    with pytest.raises(ValueError, match="device"):
        BenchmarkConfig(device="tpu")


def test_config_is_strict():
    with pytest.raises(ValueError, match="stride"):
        BenchmarkConfig(context_length=64, stride=128)
    with pytest.raises(ValueError, match="extra"):
        BenchmarkConfig(max_tokens=10)
    assert (
        BenchmarkConfig.model_validate({"context_length": 128.0, "stride": 64.0}).stride == 64
    )  # Struct numbers


@pytest.mark.slow
def test_run_benchmark_measures_in_a_child_process():
    calls = []
    result = run_benchmark(
        MODEL, EVAL, BenchmarkConfig(**FAST), lambda p, phase="", msg="", **m: calls.append(p)
    )
    assert 2.5 < result["perplexity"]["perplexity"] < 8
    assert result["perplexity"]["tokens_scored"] > 400
    assert result["latency"]["new_tokens"] == 6 and result["latency"]["kv_cache"]
    memory = result["memory"]
    assert 0 < memory["baseline_rss_mb"] <= memory["peak_rss_mb"]
    assert result["model_memory_mb"] == pytest.approx(260_032 * 4 / 2**20, rel=0.01)  # fp32, tied classifier
    assert result["size_on_disk_mb"] > 1.0
    env = result["environment"]
    assert env["threads"]["torch_intra_op"] == 1 and env["versions"]["torch"] and env["hostname"]
    assert calls[0] == 0.0 and calls[-1] == 100.0 and calls == sorted(calls)
    # The real output is the typed report: it parses, and dumps back to exactly what was returned.
    report = BenchmarkReport.parse(result)
    assert report.dump() == result and report.schema_version == SCHEMA_VERSION
    assert report.environment.threads.torch_intra_op == 1 and report.model.runtime == "torch"


@pytest.mark.slow
def test_an_onnx_folder_is_measured_in_onnx_runtime_with_its_kv_cache(tmp_path):
    from tailor_runtime.ml.onnx import MODEL_FILE, folder, verify
    from tailor_runtime.ml.onnx.export import export_optimized

    model, tokenizer = load_causal_lm(MODEL)
    folder.write_config(tmp_path, MODEL, tokenizer)
    graph, _ = export_optimized(model, tmp_path, 18, verify.sample_batches(tokenizer, 2))
    graph.rename(tmp_path / MODEL_FILE)
    folder.write_format(tmp_path, "onnx", MODEL_FILE, "float32", opset=18)

    onnx_result = run_benchmark(tmp_path, EVAL, BenchmarkConfig(**FAST), lambda *a, **k: None)
    torch_result = run_benchmark(MODEL, EVAL, BenchmarkConfig(**FAST), lambda *a, **k: None)
    assert (
        onnx_result["model"]["runtime"] == "onnxruntime" and onnx_result["model"]["ort_intra_op_threads"] == 1
    )
    assert (
        onnx_result["latency"]["kv_cache"]
        and onnx_result["latency"]["sample"] == torch_result["latency"]["sample"]
    )
    assert onnx_result["perplexity"]["perplexity"] == pytest.approx(
        torch_result["perplexity"]["perplexity"], rel=1e-5
    )
    assert onnx_result["model_memory_mb"] == pytest.approx(torch_result["model_memory_mb"], rel=0.05)


def test_cancel_kills_the_child(monkeypatch):
    children = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        children.append(real_popen(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr("tailor_benchmarker.run.subprocess.Popen", recording_popen)

    def progress(percent, phase="", message="", **metrics):
        if children:  # the child has started: the operation is cancelled now
            raise Cancelled("cancelled by the test")

    with pytest.raises(Cancelled):
        run_benchmark(MODEL, EVAL, BenchmarkConfig(**FAST), progress)
    assert children and children[0].poll() is not None


def test_an_unknown_format_fails_before_any_child_starts(tmp_path, monkeypatch):
    monkeypatch.setattr("tailor_benchmarker.run.subprocess.Popen", None)  # would fail if called
    (tmp_path / "tailor_format.json").write_text('{"format": "no-such-format"}')
    with pytest.raises(InvalidArgument, match="no-such-format.*valid choices: .*onnx"):
        run_benchmark(tmp_path, EVAL, BenchmarkConfig(**FAST), lambda *a, **k: None)


def _fake_child(monkeypatch, script: str) -> None:
    """Replace the child by a short Python script (argv[1]: the result path), to test failures fast."""
    monkeypatch.setattr(
        "tailor_benchmarker.run._child_command",
        lambda model_dir, eval_text, cfg, out: [sys.executable, "-c", script, str(out)],
    )


def test_a_crashing_child_gives_its_last_stderr_lines(monkeypatch):
    _fake_child(monkeypatch, "import sys; print('loading', file=sys.stderr); sys.exit('kernel exploded')")
    with pytest.raises(FailedPrecondition) as info:
        run_benchmark(MODEL, EVAL, BenchmarkConfig(**FAST), lambda *a, **k: None)
    assert "exited with status 1" in info.value.message and "kernel exploded" in info.value.message


def test_a_domain_error_in_the_child_keeps_its_class(monkeypatch):
    error = {
        "error": {"type": "InvalidArgument", "message": "context_length 1024 exceeds the model's context"}
    }
    _fake_child(
        monkeypatch, f"import sys, json; open(sys.argv[1], 'w').write(json.dumps({error!r})); sys.exit(1)"
    )
    with pytest.raises(InvalidArgument, match="exceeds the model's context"):
        run_benchmark(MODEL, EVAL, BenchmarkConfig(**FAST), lambda *a, **k: None)


@pytest.mark.parametrize(
    "family", ["llama3", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2", "mixtral"]
)
def test_cached_decoding_matches_full_recompute_in_every_family(family, tmp_path):
    """The benchmarker's dynamic and static KV caches against recomputing the whole prefix each token,
    on a tiny model of each family (random weights: the check is that the caches compute the same)."""
    from support.families import tiny_model

    model, tokenizer = load_causal_lm(tiny_model(family, tmp_path / family, seed=1))
    recomputed = decode_latency(
        lambda ids: model(input_ids=ids).logits, tokenizer, new_tokens=8, repetitions=1
    )
    dynamic = decode_latency(model, tokenizer, new_tokens=8, warmup=0, repetitions=1)
    static = decode_latency(model, tokenizer, new_tokens=8, warmup=0, repetitions=1, static_cache=True)
    assert dynamic["sample"] == static["sample"] == recomputed["sample"]


def test_a_childs_peak_memory_is_its_own_not_the_parents(tmp_path):
    """Linux keeps ru_maxrss across fork and exec: a measuring child of a worker holding 600 MB read a
    peak of at least 600 MB whatever it measured. The child resets its peak (VmHWM) when it starts."""
    import subprocess
    import sys

    held = bytearray(400 * 1024 * 1024)
    held[::4096] = b"\x01" * len(held[::4096])  # resident in this (the parent) process
    probe = (
        "import resource; from tailor_benchmarker.child import peak_rss_mb, reset_peak_rss; "
        "inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
        "assert reset_peak_rss(); print(inherited, peak_rss_mb())"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    inherited, own = map(float, out.split())
    assert inherited >= 400  # the bug this guards against is real here
    assert own < 300, f"the child's peak {own:.0f} MB still holds the parent's 400 MB"
    del held
