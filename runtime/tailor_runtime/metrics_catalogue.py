"""One catalogue of the metrics Tailor measures and shows: name, unit, direction, aggregation and label.

The benchmarker writes these names (`tailor_runtime.benchmark_report.BenchmarkReport.headline`), the selector takes
its objective directions from here, and the gateway's report, the CLI's tables and the dashboard label
their columns from here, so one number never carries two labels (or one label two numbers).

Pure: no torch, no protos; any process may import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOWER, HIGHER = "lower", "higher"

# The perplexity protocol shared by the benchmark (BenchmarkConfig's defaults) and the quantizer's
# accuracy gate: the same first tokens, the same windows, so the gate's "+x%" and the report's agree.
PERPLEXITY_EVAL_TOKENS = 8192
PERPLEXITY_CONTEXT_LENGTH = 256
PERPLEXITY_STRIDE = 128


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # what a column or axis shows, with the aggregation when there is one
    unit: str  # "" for a plain number
    better: str | None  # LOWER, HIGHER, or None where neither is a goal (counts)
    aggregation: str  # how the one number came out of many; "one measurement" when it did not
    description: str = ""
    # Words for a ratio against a baseline: (when this one is better, when it is worse).
    ratio_words: tuple[str, str] | None = None

    @property
    def higher_is_better(self) -> bool:
        return self.better == HIGHER

    def header(self) -> str:
        """A column header: the label and, in parentheses, the unit."""
        return f"{self.label} ({self.unit})" if self.unit and self.unit != "%" else self.label


_ALL = (
    Metric(
        "perplexity",
        "Perplexity",
        "",
        LOWER,
        "exp of the mean token NLL over the first max_eval_tokens (sliding windows)",
    ),
    Metric(
        "perplexity_increase_pct",
        "Perplexity increase",
        "%",
        LOWER,
        "relative to the baseline's perplexity on the same tokens",
    ),
    Metric("size_mb", "Size", "MB", LOWER, "one measurement", "bytes on disk, MiB", ("smaller", "larger")),
    Metric(
        "latency_ms_per_token",
        "Latency, median",
        "ms/token",
        LOWER,
        "median of every decode step of every timed run (batch 1)",
        "inter-token latency",
        ("faster", "slower"),
    ),
    Metric(
        "tokens_per_s",
        "Throughput, from median latency",
        "tokens/s",
        HIGHER,
        "1000 / median ms per token: the same median as the latency column",
        "decode rate at batch 1",
        ("faster", "slower"),
    ),
    Metric(
        "tokens_per_s_pipelined",
        "Throughput, pipelined, median run",
        "tokens/s",
        HIGHER,
        "median over timed runs of each run's rate, decoded without per-token waits",
        ratio_words=("faster", "slower"),
    ),
    Metric(
        "ttft_ms", "Time to first token, median", "ms", LOWER, "median over timed runs", "prefill latency"
    ),
    Metric("latency_p95_ms", "Latency, p95", "ms/token", LOWER, "95th percentile of decode steps"),
    Metric("latency_p99_ms", "Latency, p99", "ms/token", LOWER, "99th percentile of decode steps"),
    Metric(
        "peak_memory_mb",
        "Peak memory",
        "MB",
        LOWER,
        "peak over the run",
        "GPU allocator peak when measured on a GPU, process peak RSS on a CPU: see memory_label()",
    ),
    Metric("peak_rss_mb", "Peak RSS", "MB", LOWER, "peak over the run", "process resident set (ru_maxrss)"),
    Metric("model_memory_mb", "Weights in memory", "MB", LOWER, "one measurement", "weight bytes loaded"),
    Metric(
        "top1_agreement",
        "Top-1 agreement",
        "",
        HIGHER,
        "fraction of eval tokens whose greedy next token matches the reference model's",
    ),
    Metric("kl_divergence", "KL divergence, mean", "nats", LOWER, "mean KL(reference || model) per token"),
    Metric("choice_accuracy", "Multiple-choice accuracy", "", HIGHER, "mean over examples"),
    Metric("exact_match", "Exact match", "", HIGHER, "mean over generation examples"),
    Metric("bleu", "BLEU", "", HIGHER, "corpus BLEU over generation examples"),
    Metric("rouge_l", "ROUGE-L", "", HIGHER, "mean over generation examples"),
    Metric("eval_tokens", "Tokens scored", "tokens", None, "count"),
    # Roofline estimates for a target profile (tailor_runtime.roofline): estimates, never measurements.
    Metric("est_memory_mb", "Estimated memory", "MB", LOWER, "roofline estimate"),
    Metric("est_latency_p95_ms", "Estimated latency, p95", "ms/token", LOWER, "roofline estimate"),
    Metric("est_tokens_per_s", "Estimated throughput", "tokens/s", HIGHER, "roofline estimate"),
    Metric("est_latency_ms_per_token", "Estimated latency", "ms/token", LOWER, "roofline estimate"),
    Metric("est_fits", "Fits the target's memory", "", HIGHER, "1 or 0, roofline estimate"),
)
CATALOGUE: dict[str, Metric] = {m.name: m for m in _ALL}

# Per batch size b: tokens of all b rows per second, b x the median run's decode rate.
BATCH_THROUGHPUT_PREFIX = "tokens_per_s_batch_"
# Keys of the benchmarker's headline that say where a number was measured; not metrics themselves.
CONTEXT_KEYS = ("device", "environment")


def lookup(name: str) -> Metric | None:
    """The catalogue's entry for `name`, including the per-batch throughput family; None if unknown."""
    if name in CATALOGUE:
        return CATALOGUE[name]
    if name.startswith(BATCH_THROUGHPUT_PREFIX) and name[len(BATCH_THROUGHPUT_PREFIX) :].isdigit():
        b = name[len(BATCH_THROUGHPUT_PREFIX) :]
        return Metric(
            name,
            f"Throughput at batch {b}, median run",
            "tokens/s",
            HIGHER,
            f"{b} x the median over timed runs of each run's decode rate",
            ratio_words=("faster", "slower"),
        )
    return None


def label(name: str) -> str:
    found = lookup(name)
    return found.label if found else name.replace("_", " ")


def unit(name: str) -> str:
    found = lookup(name)
    return found.unit if found else ""


def higher_is_better(name: str) -> bool:
    """The direction of a known metric; unknown ones are minimized (the selector's default)."""
    found = lookup(name)
    return bool(found and found.higher_is_better)


def memory_label(device: str | None) -> str:
    """What `peak_memory_mb` measured: torch's GPU allocator peak on a GPU, the process's RSS on a CPU."""
    if device == "cuda":
        return "Peak GPU memory (allocated)"
    if device == "cpu":
        return "Peak RSS"
    return "Peak memory (GPU allocated or RSS)"


def memory_label_for(devices: set[str | None]) -> str:
    """One column header for rows measured on `devices`: named by what was measured when they agree."""
    known = {d for d in devices if d}
    return memory_label(known.pop() if len(known) == 1 else None)


def ratio_text(name: str, value: float, baseline: float) -> str | None:
    """`value` against `baseline` in words that never invert: "1.28x slower", "2.00x smaller".

    The ratio is always >= 1; the word says which way. None when either is missing or not positive."""
    found = lookup(name)
    if found is None or found.ratio_words is None or found.better is None:
        return None
    if not (_positive(value) and _positive(baseline)):
        return None
    better_word, worse_word = found.ratio_words
    ours_over_theirs = value / baseline
    improvement = ours_over_theirs if found.higher_is_better else 1 / ours_over_theirs
    if round(improvement, 2) == 1.0:
        return f"1.00x ({'same speed' if better_word == 'faster' else 'same ' + found.label.lower()})"
    if improvement > 1:
        return f"{improvement:.2f}x {better_word}"
    return f"{1 / improvement:.2f}x {worse_word}"


def _positive(x: float | None) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0
