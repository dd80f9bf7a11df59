"""Greedy-decoding latency: time to first token, then the time of each following token.

One run encodes the prompt, runs the prefill (the first new token comes out of it: time to first
token), then decodes exactly `new_tokens - 1` more tokens one at a time, each timed on its own. EOS is
ignored so every run and every model decodes the same number of tokens. A Hugging Face model, and an
ONNX decoder (`tailor_runtime.ml.onnx.session.OnnxCausalLM`, past key/values in and out), decodes with
its KV cache; a plain logits callable recomputes the whole sequence per token, and the result says so
with `kv_cache: false`.

Warmup runs are discarded (first-call allocations, lazy kernels); the figures are taken over
`repetitions` timed runs: TTFT per run, and every decode step of every run for inter-token latency
(median, p50/p95/p99, stdev, interquartile range). Throughput at larger batches decodes `b` copies of
the prompt together (same length, no padding) and counts the tokens of every row.

With `static_cache` (the default on a GPU) an HF model decodes with a preallocated cache and, with
`compile`, a compiled (CUDA-graphed) step: `tailor_runtime.ml.fast_decode.StaticDecoder`. Each timed run
is then decoded a second time without waiting for each token, and `pipelined_tokens_per_s` reports that
rate: streaming (`tokens_per_s`, each token waited for) pays the host's per-call overhead on every
token, which a pipelined decode hides behind the GPU's work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml.perplexity import logits_fn_for


class _KVCacheDecoder:
    """Greedy decoding of an HF causal LM with its (dynamic) KV cache: the prefill, then one token per
    call. Each prefill starts a new cache, so one decoder serves many runs."""

    def __init__(self, model: Any):
        from tailor_runtime.ml.perplexity import model_device

        self.model = model
        self.device = model_device(model)
        self.cache = None

    def prefill(self, prompt_ids: Any) -> Any:
        out = self.model(input_ids=prompt_ids.to(self.device), use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self, token: Any) -> Any:
        out = self.model(input_ids=token, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].argmax(-1, keepdim=True)


class _RecomputeDecoder:
    """Greedy decoding without a cache: every token runs the whole sequence again."""

    def __init__(self, logits_fn: Any):
        self.logits_fn = logits_fn
        self.ids = None

    def prefill(self, prompt_ids: Any) -> Any:
        self.ids = prompt_ids
        return self.logits_fn(self.ids)[:, -1].argmax(-1, keepdim=True)

    def step(self, token: Any) -> Any:
        import torch

        self.ids = torch.cat([self.ids, token], dim=1)
        return self.logits_fn(self.ids)[:, -1].argmax(-1, keepdim=True)


def greedy_decoder(model: Any, static: DecodeOptions | None = None) -> Any:
    """A greedy decoder: with the KV cache for an HF model (a static one when `static` is given), by
    recomputation for a logits callable."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return _RecomputeDecoder(logits_fn_for(model))
    if static is None:
        return _KVCacheDecoder(model)
    from tailor_runtime.ml.fast_decode import StaticDecoder

    return StaticDecoder(model, static.max_len, compile=static.compile, batch_size=static.batch_size)


@dataclass(frozen=True)
class DecodeOptions:
    """A static KV cache of `max_len` positions for `batch_size` rows; `compile` the decode step."""

    max_len: int
    batch_size: int = 1
    compile: bool = False


def _one_run(decoder: Any, prompt_ids: Any, new_tokens: int) -> tuple[float, list[float], list[int]]:
    """(ttft seconds, per-step seconds, generated ids of the first row) of one greedy run."""
    start = time.perf_counter()
    token = decoder.prefill(prompt_ids)
    ttft = time.perf_counter() - start
    generated = [int(token[0, 0])]
    steps = []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        token = decoder.step(token)
        generated.append(int(token[0, 0]))  # int() forces the result, so the step is fully timed
        steps.append(time.perf_counter() - t0)
    return ttft, steps, generated


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without importing numpy for it."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _ms_stats(seconds: list[float]) -> dict[str, float]:
    """Median, percentiles and spread (stdev, interquartile range) in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "median": statistics.median(ms),
        "p50": _percentile(ms, 50),
        "p95": _percentile(ms, 95),
        "p99": _percentile(ms, 99),
        "mean": statistics.fmean(ms),
        "stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0,
        "iqr": _percentile(ms, 75) - _percentile(ms, 25),
        "min": min(ms),
        "max": max(ms),
        "count": len(ms),
    }


def _pipelined(runs: dict[str, Any]) -> dict[str, float]:
    """{"pipelined_tokens_per_s": median} when the runs were also decoded without per-token waits."""
    rates = runs["pipelined_rates"]
    return {"pipelined_tokens_per_s": statistics.median(rates)} if rates else {}


def _timed_runs(
    model: Any,
    prompt_ids: Any,
    new_tokens: int,
    warmup: int,
    repetitions: int,
    on_run: Callable[[], None],
    static: DecodeOptions | None = None,
) -> dict[str, Any]:
    """Seconds of every timed run (warm-up runs discarded) and the last run's tokens. One decoder serves
    every run of a batch size (a compiled static-cache step is compiled once, in the warm-up)."""
    import torch

    runs: dict[str, Any] = {
        "ttft": [],
        "steps": [],
        "totals": [],
        "decode_rates": [],
        "pipelined_rates": [],
        "generated": [],
    }
    static = None if static is None else replace(static, batch_size=prompt_ids.shape[0])
    decoder = greedy_decoder(model, static)
    # A static cache is written in place after its first use, which inference tensors forbid.
    with torch.inference_mode(static is None):
        for run in range(warmup + repetitions):
            ttft, run_steps, generated = _one_run(decoder, prompt_ids, new_tokens)
            on_run()
            if run < warmup:
                continue
            runs["ttft"].append(ttft)
            runs["steps"].extend(run_steps)
            runs["totals"].append(ttft + sum(run_steps))
            runs["decode_rates"].append(len(run_steps) / sum(run_steps))
            runs["generated"] = generated
            if static is not None:
                # The same decode without waiting for each token (generate): what a caller that does
                # not stream gets. On a GPU the host then prepares step t+1 while step t runs, so
                # per-call overhead (graph replay, guards) is hidden; streaming pays it on every token.
                _, timing = decoder.generate(prompt_ids, new_tokens)
                runs["pipelined_rates"].append(timing.tokens_per_s)
    runs["compiled"] = getattr(decoder, "compiled", False)
    runs["compile_error"] = getattr(decoder, "compile_error", None)
    return runs


def decode_latency(
    model: Any,
    tokenizer: Any,
    prompt: str = "Once upon a time",
    new_tokens: int = 32,
    warmup: int = 1,
    repetitions: int = 3,
    on_run: Callable[[int, int], None] | None = None,
    batch_sizes: Sequence[int] = (1,),
    static_cache: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Greedy-decoding latency of `model` (HF causal LM, or a logits callable without KV cache).

    The latency figures are those of batch 1. `throughput` holds, per batch size, the decode rate of
    `b` copies of the prompt decoded together (tokens of all rows per second). `on_run(done, total)`
    is called after each run, warmup included (progress reporting). `static_cache` decodes an HF model
    with a preallocated cache of exactly prompt + new_tokens positions, `compile` compiles its step.
    """
    import torch

    if new_tokens < 2:
        raise InvalidArgument(
            f"latency_new_tokens must be at least 2 (one prefill, one decode), got {new_tokens}"
        )
    if repetitions < 1 or warmup < 0:
        raise InvalidArgument(f"need repetitions >= 1 and warmup >= 0, got {repetitions} and {warmup}")
    if any(b < 1 for b in batch_sizes):
        raise InvalidArgument(f"batch sizes must be positive, got {list(batch_sizes)}")
    prompt_ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]], dtype=torch.long)
    if prompt_ids.shape[1] == 0:
        raise InvalidArgument("latency_prompt is empty")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and prompt_ids.shape[1] + new_tokens > limit:
        raise InvalidArgument(
            f"prompt ({prompt_ids.shape[1]} tokens) + latency_new_tokens ({new_tokens}) exceeds the "
            f"model's context of {limit} tokens"
        )

    if compile and not static_cache:
        raise InvalidArgument("compile needs static_cache (a compiled step needs fixed shapes)")
    is_module = isinstance(model, torch.nn.Module)
    static = (
        DecodeOptions(prompt_ids.shape[1] + new_tokens, compile=compile)
        if static_cache and is_module
        else None
    )
    sizes = sorted({1, *batch_sizes})
    done = [0]
    total_runs = (warmup + repetitions) * len(sizes)

    def count_run() -> None:
        done[0] += 1
        if on_run is not None:
            on_run(done[0], total_runs)

    by_batch = {
        b: _timed_runs(model, prompt_ids.repeat(b, 1), new_tokens, warmup, repetitions, count_run, static)
        for b in sizes
    }
    one = by_batch[1]
    per_token = _ms_stats(one["steps"])
    return {
        "prompt_tokens": int(prompt_ids.shape[1]),
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repetitions": repetitions,
        "kv_cache": is_module,
        "kv_cache_kind": "static" if static else "dynamic" if is_module else None,
        # Compiled where it was asked for and torch.compile could (per batch size; why not otherwise).
        "compiled": one["compiled"],
        **({"compile_error": one["compile_error"]} if one["compile_error"] else {}),
        "ttft_ms": _ms_stats(one["ttft"]),
        # Inter-token latency: every decode step after the first token, of every timed run.
        "per_token_ms": per_token,
        "ms_per_token": per_token["median"],
        # Decode throughput (tokens after the first, per second of decoding), median over runs, with
        # each token waited for (streamed).
        "tokens_per_s": statistics.median(one["decode_rates"]),
        **_pipelined(one),
        # Whole request: new_tokens over prefill + decode time, median over runs.
        "end_to_end_tokens_per_s": statistics.median(new_tokens / t for t in one["totals"]),
        "total_ms": _ms_stats(one["totals"]),
        "throughput": {
            str(b): {
                "batch_size": b,
                "tokens_per_s": b * statistics.median(runs["decode_rates"]),
                "ms_per_step": _ms_stats(runs["steps"])["median"],
                "ttft_ms": _ms_stats(runs["ttft"])["median"],
                "compiled": runs["compiled"],
                **{k: b * v for k, v in _pipelined(runs).items()},
            }
            for b, runs in by_batch.items()
        },
        "torch_threads": torch.get_num_threads(),
        # The prompt and its greedy continuation: a quick check that the model is the model it claims.
        "sample": tokenizer.decode(prompt_ids[0].tolist() + one["generated"], skip_special_tokens=True),
    }
