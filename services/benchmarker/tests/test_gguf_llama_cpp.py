"""A gguf folder is benchmarked in llama.cpp: the bundled real model (stories260K) exported to GGUF F16.

The llama.cpp tests need llama-cpp-python (requirements-llamacpp.txt). Without it they skip, saying why; with
TAILOR_REQUIRE_LLAMA_CPP=1 (what `make test` sets) its absence fails them instead. The missing-package error
is tested without it.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch
from support.optional import require_llama_cpp

from tailor_benchmarker.config import BenchmarkConfig
from tailor_benchmarker.latency import decode_latency
from tailor_benchmarker.run import run_benchmark
from tailor_runtime import libraries
from tailor_runtime.errors import FailedPrecondition, InvalidArgument
from tailor_runtime.ml.model_io import load_causal_lm, load_tokenizer
from tailor_runtime.ml.perplexity import perplexity

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples/models/stories260K"
EVAL = REPO / "examples/data/tinystories_eval.txt"
FAST = dict(
    max_eval_tokens=512,
    context_length=64,
    stride=32,
    latency_new_tokens=8,
    warmup=1,
    repetitions=2,
    threads=1,
    batch_sizes=(1, 3),
    agreement_max_tokens=512,
)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def gguf_f16(tmp_path_factory) -> Path:
    """stories260K through the exporter's `gguf` format, type F16 (verified in llama.cpp by the exporter)."""
    require_llama_cpp()
    from tailor_exporter.gguf_export import GgufExportConfig, export_gguf
    from tailor_runtime.progress import no_progress

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("gguf") / "f16"
    export_gguf(MODEL, out, GgufExportConfig(type="F16"), no_progress)
    return out


@pytest.fixture(scope="module")
def lm():
    torch.set_num_threads(1)
    return load_causal_lm(MODEL)


@pytest.mark.slow
def test_a_gguf_folder_is_benchmarked_in_llama_cpp(gguf_f16, lm):
    result = run_benchmark(gguf_f16, EVAL, BenchmarkConfig(**FAST), lambda *a, **k: None, reference_dir=MODEL)
    model, tokenizer = lm
    source = perplexity(model, tokenizer, EVAL.read_text(encoding="utf-8"), 64, 32, 512)

    info = result["model"]
    assert info["runtime"] == "llama.cpp" and info["format"] == "gguf" and info["gguf_type"] == "F16"
    assert info["llama_cpp_python"] == metadata.version("llama-cpp-python")
    assert info["llama_cpp_threads"] == 1 and result["threads"]["llama_cpp"] == 1
    assert result["environment"]["versions"]["llama-cpp-python"] == info["llama_cpp_python"]
    assert info["vocab_check"]["pieces_compared"] == 512 and info["vocab_check"]["pieces_differing"] == 0

    # Same protocol, same token ids. F16 weights (11-bit mantissa) move stories260K's perplexity by about
    # 0.005% here; 1% leaves room for other llama.cpp builds' kernels, while a broken file (Q/K layout,
    # vocabulary) is off by far more, and the agreement below is the sharper check.
    ppl = result["perplexity"]
    assert ppl["tokens_scored"] == source["tokens_scored"] and ppl["windows"] == source["windows"]
    assert ppl["perplexity"] == pytest.approx(source["perplexity"], rel=0.01)
    agreement = result["agreement"]
    assert agreement["reference"]["runtime"] == "torch" and agreement["positions"] == source["tokens_scored"]
    assert agreement["top1_agreement"] >= 0.99 and agreement["kl_divergence"] < 1e-3

    lat = result["latency"]
    assert lat["kv_cache"] and lat["new_tokens"] == 8 and lat["repetitions"] == 2
    steps = lat["per_token_ms"]
    assert 0 < steps["p50"] <= steps["p95"] <= steps["p99"] <= steps["max"]
    assert steps["count"] == 2 * 7 and lat["ttft_ms"]["median"] > 0 and lat["tokens_per_s"] > 0
    assert lat["sample"].startswith("Once upon a time, there was a little")
    # Batch 3 is decoded by llama.cpp as three sequences in one context, every step one llama_decode call.
    assert lat["throughput"]["3"]["batch_size"] == 3 and lat["throughput"]["3"]["tokens_per_s"] > 0
    assert info["max_batch"] == 3

    # llama.cpp's tensors: F16 matrices, F32 norms, about half the float32 source's 1,040,160 bytes.
    assert 0.4 < result["model_memory_mb"] * 2**20 / 1_040_160 < 0.6
    assert 0 < result["memory"]["baseline_rss_mb"] <= result["memory"]["peak_rss_mb"]


@pytest.mark.slow
def test_llama_cpp_decodes_like_pytorch_row_by_row_and_in_batches(gguf_f16, lm):
    from tailor_runtime.ml.llama_cpp_model import LlamaCppCausalLM

    model, tokenizer = lm
    llama = LlamaCppCausalLM(gguf_f16, threads=1, n_ctx=64, max_batch=3, batch_n_ctx=32)
    try:
        ids = torch.tensor([tokenizer("Once upon a time, there was a little girl")["input_ids"]])
        with torch.inference_mode():
            want = model(input_ids=ids).logits
            one = llama(input_ids=ids).logits
            three = llama(input_ids=ids.repeat(3, 1)).logits
        assert one.shape == want.shape and three.shape == (3, *want.shape[1:])
        # F16 weights: logits within a few hundredths of float32 PyTorch; the batched kernels may differ too.
        assert (one - want).abs().max() < 0.1 and (three - one).abs().max() < 0.1
        assert torch.equal(one.argmax(-1), want.argmax(-1)) and torch.equal(
            three.argmax(-1), one.expand(3, -1, -1).argmax(-1)
        )

        mine = decode_latency(llama, tokenizer, new_tokens=12, warmup=0, repetitions=1, batch_sizes=(1, 3))
        theirs = decode_latency(model, tokenizer, new_tokens=12, warmup=0, repetitions=1)
        assert mine["kv_cache"] and mine["sample"] == theirs["sample"]

        # The cache lives in the context: a ticket of a sequence that has moved on is refused.
        first = llama(input_ids=ids, use_cache=True).past_key_values
        llama(input_ids=ids, use_cache=True)
        with pytest.raises(InvalidArgument, match="stale past_key_values"):
            llama(input_ids=ids[:, :1], past_key_values=first)
        with pytest.raises(InvalidArgument, match="exceed the llama.cpp context of 64"):
            llama(input_ids=torch.ones(1, 65, dtype=torch.long))
    finally:
        llama.close()


@pytest.mark.slow
def test_a_vocabulary_that_does_not_match_the_tokenizer_is_refused(gguf_f16):
    from tailor_runtime.ml.llama_cpp_model import LlamaCppCausalLM

    class Swapped:  # the folder's tokenizer with two pieces exchanged
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __len__(self):
            return len(self.tokenizer)

        def convert_ids_to_tokens(self, ids):
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            pieces[300], pieces[301] = pieces[301], pieces[300]
            return pieces

    llama = LlamaCppCausalLM(gguf_f16, threads=1, n_ctx=16)
    try:
        assert llama.check_vocab(load_tokenizer(gguf_f16))["pieces_differing"] == 0
        with pytest.raises(FailedPrecondition, match="2 pieces differ: 300"):
            llama.check_vocab(Swapped(load_tokenizer(gguf_f16)))
    finally:
        llama.close()


def test_without_llama_cpp_a_gguf_benchmark_names_the_package_to_install(tmp_path, monkeypatch):
    real = libraries.importable

    def no_llama_cpp(*modules):
        if "llama_cpp" in modules:
            return (
                False,
                "llama_cpp cannot be imported here (ModuleNotFoundError: No module named 'llama_cpp')",
            )
        return real(*modules)

    monkeypatch.setattr(libraries, "importable", no_llama_cpp)
    monkeypatch.setattr("tailor_benchmarker.run.subprocess.Popen", None)  # no child may start
    (tmp_path / "tailor_format.json").write_text('{"format": "gguf", "file": "model.gguf"}')
    with pytest.raises(FailedPrecondition) as info:
        run_benchmark(tmp_path, EVAL, BenchmarkConfig(**FAST), lambda *a, **k: None)
    assert "llama-cpp-python" in info.value.message and "requirements-llamacpp.txt" in info.value.message
    assert "No module named 'llama_cpp'" in info.value.message

    # The child refuses the same way if it gets that far (the adapter checks too).
    from tailor_runtime.ml.llama_cpp_model import LlamaCppCausalLM

    with pytest.raises(FailedPrecondition, match="requirements-llamacpp.txt"):
        LlamaCppCausalLM(tmp_path)
