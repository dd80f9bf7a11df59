"""Benchmark reports built from the typed contract (`tailor_runtime.benchmark_report`), for every reader's
tests: the same shape the benchmarker writes, so a reader that expects another key fails its test."""

from __future__ import annotations

from tailor_runtime.benchmark_report import (
    SCHEMA_VERSION,
    Agreement,
    BenchmarkReport,
    Environment,
    Generation,
    GenerationSample,
    Gpu,
    Latency,
    Memory,
    ModelInfo,
    MultipleChoice,
    Perplexity,
    Stats,
    Threads,
    Throughput,
)


def _stats(median: float, p95: float, p99: float) -> Stats:
    return Stats(
        median=median,
        p50=median,
        p95=p95,
        p99=p99,
        mean=median * 1.05,
        stdev=median * 0.1,
        iqr=median * 0.12,
        min=median * 0.9,
        max=p99 * 1.2,
        count=30,
    )


def sample_environment() -> Environment:
    """The machine of tests/support/report_sample.py's pipeline summary."""
    return Environment(
        cpu_model="Intel(R) Xeon(R) Platinum 8481C",
        cpu_count=8,
        cpus_usable=2,
        memory_total_mb=8192.0,
        gpu=None,
        threads=Threads(torch_intra_op=1, torch_inter_op=1),
        hostname="bench-box",
        platform="Linux-6.1-x86_64-with-glibc2.36",
        python="3.11.2",
        versions={"torch": "2.13.0", "transformers": "5.23.0", "onnxruntime": "1.31.1", "triton": None},
    )


def sample_report(
    perplexity: float = 3.912,
    size_mb: float = 1.05,
    ms_per_token: float = 0.91,
    p95_ms: float = 1.1,
    peak_rss_mb: float = 420.0,
    *,
    gpu: bool = False,
    model_id: str = "0123456789abcdef" * 4,
) -> BenchmarkReport:
    """A report with every optional measurement (reference, choices, generation, batches 1 and 4)."""
    threads = Threads(torch_intra_op=1, torch_inter_op=1)
    environment = sample_environment()
    device_gpu = None
    if gpu:
        device_gpu = Gpu(name="NVIDIA H200", compute_capability="9.0", memory_total_mb=143771.0, cuda="12.8")
        environment = environment.model_copy(update={"gpu": device_gpu})
    return BenchmarkReport(
        schema_version=SCHEMA_VERSION,
        model_id=model_id,
        reference_model="f" * 64,
        model=ModelInfo(
            format="hf-safetensors", runtime="torch", dtype="float32", device="cuda" if gpu else "cpu"
        ),
        model_memory_mb=size_mb * 0.95,
        size_on_disk_mb=size_mb,
        memory=Memory(
            baseline_rss_mb=300.0,
            rss_after_load_mb=310.0,
            peak_rss_mb=peak_rss_mb,
            peak_rss_over_baseline_mb=peak_rss_mb - 300.0,
            **({"gpu_allocated_after_load_mb": 2.0, "gpu_peak_allocated_mb": 40.0} if gpu else {}),
        ),
        perplexity=Perplexity(
            perplexity=perplexity,
            mean_nll=1.364,
            tokens_scored=8191,
            tokens_total=8192,
            windows=64,
            context_length=256,
            stride=128,
            max_tokens=8192,
            split_documents=True,
            text_truncated=True,
            protocol="sliding window",
        ),
        latency=Latency(
            prompt_tokens=5,
            new_tokens=32,
            warmup=1,
            repetitions=3,
            kv_cache=True,
            kv_cache_kind="static" if gpu else "dynamic",
            compiled=gpu,
            ttft_ms=_stats(2 * ms_per_token, 2.2 * ms_per_token, 2.4 * ms_per_token),
            per_token_ms=_stats(ms_per_token, p95_ms, p95_ms * 1.1),
            ms_per_token=ms_per_token,
            tokens_per_s=1000.0 / ms_per_token * 0.97,  # the median run's rate: not the headline
            **({"pipelined_tokens_per_s": 2000.0 / ms_per_token} if gpu else {}),
            end_to_end_tokens_per_s=900.0 / ms_per_token,
            total_ms=_stats(33 * ms_per_token, 35 * ms_per_token, 36 * ms_per_token),
            throughput={
                str(b): Throughput(
                    batch_size=b,
                    tokens_per_s=b * 1000.0 / ms_per_token * (0.9 if b > 1 else 1.0),
                    ms_per_step=ms_per_token,
                    ttft_ms=2 * ms_per_token,
                    compiled=gpu,
                )
                for b in (1, 4)
            },
            torch_threads=1,
            sample="Once upon a time, there was a little girl",
        ),
        agreement=Agreement(
            top1_agreement=0.97,
            kl_divergence=0.01,
            kl_divergence_max=0.4,
            positions=2048,
            context_length=256,
            stride=128,
            max_tokens=2048,
            protocol="top-1 and KL",
            reference=ModelInfo(format="hf-safetensors", runtime="torch", folder="parent"),
        ),
        multiple_choice=MultipleChoice(
            accuracy=0.6, accuracy_norm=0.58, examples=100, chance=0.5, template="{}", choices=["bad", "good"]
        ),
        generation=Generation(
            exact_match=0.1,
            bleu=0.2,
            rouge_l=0.3,
            examples=4,
            prompt_tokens=32,
            new_tokens=16,
            sample=GenerationSample(prediction="a cat", reference="a dog"),
        ),
        threads=threads,
        gpu=device_gpu,
        wall_s=12.5,
        config={"max_eval_tokens": 8192, "context_length": 256, "stride": 128, "device": "auto"},
        environment=environment,
    )
