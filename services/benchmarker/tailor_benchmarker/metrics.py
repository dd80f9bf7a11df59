"""A benchmark result's headline numbers, under the names the whole platform uses. Pure: no torch, no protos.

The servicer reports them as the operation's metrics; the selector and the CLI read them from report files.
"""

from __future__ import annotations

from typing import Any


def headline_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers the selector and the report compare, under the names the whole platform uses.

    `peak_memory_mb` is the memory the model needed where it ran: the GPU's peak allocation for a model
    measured on a GPU (`device` "cuda"), the process's peak RSS on a CPU; `peak_rss_mb` is always the
    RSS (the roofline's CPU targets use it). `tokens_per_s` is 1000 / the median ms per token, so the two
    columns shown side by side are one aggregation (the catalogue, `tailor_runtime.metrics_catalogue`,
    labels them); the raw report keeps the median run's rate as `latency.tokens_per_s`."""
    memory = result["memory"]
    ms_per_token = result["latency"]["ms_per_token"]
    on_gpu = "gpu_peak_allocated_mb" in memory
    return {
        "perplexity": result["perplexity"]["perplexity"],
        "latency_ms_per_token": ms_per_token,
        "tokens_per_s": 1000.0 / ms_per_token if ms_per_token > 0 else float("nan"),
        "device": "cuda" if on_gpu else "cpu",
        "peak_memory_mb": memory["gpu_peak_allocated_mb"] if on_gpu else memory["peak_rss_mb"],
        "peak_rss_mb": memory["peak_rss_mb"],
        "model_memory_mb": result["model_memory_mb"],
        "size_mb": result["size_on_disk_mb"],
        "eval_tokens": result["perplexity"].get("tokens_scored", 0),
        "environment": result.get("environment", {}),
        **optional_metrics(result),
    }


def optional_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Headline numbers of the measurements a request asked for (reference model, tasks, batches)."""
    lat = result["latency"]
    found = {"ttft_ms": lat["ttft_ms"]["median"], "latency_p95_ms": lat["per_token_ms"]["p95"]}
    if "p99" in lat["per_token_ms"]:  # reports written before p99 was measured have none
        found["latency_p99_ms"] = lat["per_token_ms"]["p99"]
    if "pipelined_tokens_per_s" in lat:  # static cache: also decoded without per-token waits
        found["tokens_per_s_pipelined"] = lat["pipelined_tokens_per_s"]
    for b, row in (lat.get("throughput") or {}).items():
        found[f"tokens_per_s_batch_{b}"] = row["tokens_per_s"]
    if "agreement" in result:
        found["top1_agreement"] = result["agreement"]["top1_agreement"]
        found["kl_divergence"] = result["agreement"]["kl_divergence"]
    if "multiple_choice" in result:
        found["choice_accuracy"] = result["multiple_choice"]["accuracy"]
    if "generation" in result:
        gen = result["generation"]
        found.update(exact_match=gen["exact_match"], bleu=gen["bleu"], rouge_l=gen["rouge_l"])
    return found
