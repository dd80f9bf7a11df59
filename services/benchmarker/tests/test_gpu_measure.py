"""The benchmarker on a CUDA GPU, for real, on the bundled stories260K model and real TinyStories text.

Run through the device tool (bench/gpu_session.sh tests): python -m pytest -m gpu this file. CI has no GPU
and deselects them (-m "not gpu"); without a GPU they are skipped, never counted as passing.

What must hold on the GPU: the same model gives the same perplexity and the same greedy tokens as on the
CPU; decode timing uses the static cache and the compiled step; a 4-bit compressed-tensors model runs as
packed int4 layers (Tailor's Triton kernel) with the CPU's perplexity; bitsandbytes NF4 runs there too;
the report carries the GPU and its memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tailor_benchmarker.child import measure
from tailor_benchmarker.config import BenchmarkConfig

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "examples/models/stories260K"
EVAL = REPO / "examples/data/tinystories_eval.txt"
SMALL = dict(
    max_eval_tokens=1024,
    context_length=128,
    stride=64,
    latency_new_tokens=16,
    warmup=1,
    repetitions=2,
    batch_sizes=(1,),  # each batch size compiles its own step: the first test adds batch 2
    agreement_max_tokens=512,
    threads=4,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _quantize(name: str, config: dict, out: Path) -> Path:
    from tailor_quantizer.methods import QuantizeJob, get_method, parse_config
    from tailor_runtime.progress import no_progress

    method = get_method(name)
    ok, why = method.availability()
    if not ok:
        pytest.fail(f"{name} cannot run on this GPU machine: {why}")
    method.run(MODEL, out, parse_config(method, config), QuantizeJob(no_progress, device="cuda"))
    return out


@pytest.fixture(scope="module")
def cpu_result():
    return measure(MODEL, EVAL, BenchmarkConfig(**SMALL, device="cpu"))


def test_the_gpu_gives_the_cpu_numbers_with_a_compiled_static_cache(cpu_result):
    config = BenchmarkConfig(**{**SMALL, "batch_sizes": (1, 2)})  # device auto: the GPU
    gpu = measure(MODEL, EVAL, config, reference_dir=MODEL)
    assert gpu["model"]["device"] == "cuda" and cpu_result["model"]["device"] == "cpu"
    assert gpu["perplexity"]["perplexity"] == pytest.approx(cpu_result["perplexity"]["perplexity"], rel=1e-3)
    latency = gpu["latency"]
    assert latency["kv_cache_kind"] == "static" and latency["compiled"], latency.get("compile_error")
    assert latency["sample"] == cpu_result["latency"]["sample"]
    assert latency["throughput"]["2"]["tokens_per_s"] > 0 and latency["pipelined_tokens_per_s"] > 0
    assert gpu["agreement"]["top1_agreement"] > 0.99  # against itself, run on the GPU too
    assert gpu["memory"]["gpu_peak_allocated_mb"] >= gpu["memory"]["gpu_allocated_after_load_mb"] > 0
    assert gpu["gpu"]["name"] and gpu["gpu"]["compute_capability"]
    from tailor_benchmarker.metrics import headline_metrics

    headline = headline_metrics({**gpu, "size_on_disk_mb": 1.0})
    _is_a_typed_report(gpu)
    assert headline["device"] == "cuda" and headline["tokens_per_s_pipelined"] > 0
    assert headline["peak_memory_mb"] == gpu["memory"]["gpu_peak_allocated_mb"]
    print("stories260K fp32 on", gpu["gpu"]["name"], latency["tokens_per_s"], "tokens/s")


def test_a_4bit_gptq_model_runs_as_packed_int4_layers_with_the_cpu_perplexity(tmp_path):
    folder = _quantize("rtn", {"bits": 4, "group_size": 4}, tmp_path / "rtn")
    cpu = measure(folder, EVAL, BenchmarkConfig(**SMALL, device="cpu"))
    gpu = measure(folder, EVAL, BenchmarkConfig(**SMALL, device="cuda"))
    assert gpu["model"]["packed_int4"] == {"packed_layers": 35}
    assert gpu["perplexity"]["perplexity"] == pytest.approx(cpu["perplexity"]["perplexity"], rel=1e-3)
    assert gpu["latency"]["compiled"], gpu["latency"].get("compile_error")
    assert gpu["latency"]["sample"] == cpu["latency"]["sample"]
    assert _is_a_typed_report(gpu).model.packed_int4 == {"packed_layers": 35}


def test_bitsandbytes_nf4_is_measured_on_the_gpu(tmp_path):
    folder = _quantize("nf4", {}, tmp_path / "nf4")
    gpu = measure(folder, EVAL, BenchmarkConfig(**SMALL, device="cuda"))
    assert gpu["model"]["device"] == "cuda" and gpu["latency"]["kv_cache_kind"] == "static"
    assert 2.5 < gpu["perplexity"]["perplexity"] < 10
    # Compiled where torch.compile can capture bitsandbytes' layers; the report says which.
    print("nf4 compiled:", gpu["latency"]["compiled"], gpu["latency"].get("compile_error"))
    _is_a_typed_report(gpu)


def _is_a_typed_report(measured: dict):
    """A GPU measurement fits the report's schema (GPU memory, the device, compile flags) and dumps back."""
    from tailor_runtime.benchmark_report import BenchmarkReport

    report = BenchmarkReport.parse(measured, "the GPU measurement")
    assert report.device == "cuda" and report.gpu is not None and report.gpu.name
    assert report.dump() == measured
    return report
