"""Greedy-decoding latency: time to first token, then the time of each following token.

One run encodes the prompt, runs the prefill (the first new token comes out of it: time to first
token), then decodes exactly `new_tokens - 1` more tokens one at a time, each timed on its own. EOS is
ignored so every run and every model decodes the same number of tokens. A Hugging Face model decodes
with its KV cache; a plain logits callable (ONNX Runtime without cache inputs) recomputes the whole
sequence per token, and the result says so with `kv_cache: false`.

Warmup runs are discarded (first-call allocations, lazy kernels); the figures are taken over
`repetitions` timed runs: TTFT per run, and every decode step of every run for per-token latency.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml.perplexity import logits_fn_for


class _KVCacheDecoder:
    """Greedy decoding of an HF causal LM with its KV cache: the prefill, then one token per call."""

    def __init__(self, model: Any):
        self.model = model
        self.cache = None

    def prefill(self, prompt_ids: Any) -> Any:
        out = self.model(input_ids=prompt_ids, use_cache=True)
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


def _one_run(decoder: Any, prompt_ids: Any, new_tokens: int) -> tuple[float, list[float], list[int]]:
    """(ttft seconds, per-step seconds, generated ids) of one greedy run."""
    start = time.perf_counter()
    token = decoder.prefill(prompt_ids)
    ttft = time.perf_counter() - start
    generated = [int(token)]
    steps = []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        token = decoder.step(token)
        generated.append(int(token))  # int() forces the result, so the step is fully timed
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
    ms = [s * 1000 for s in seconds]
    return {
        "median": statistics.median(ms),
        "p50": _percentile(ms, 50),
        "p95": _percentile(ms, 95),
        "mean": statistics.fmean(ms),
        "min": min(ms),
        "max": max(ms),
    }


def decode_latency(
    model: Any,
    tokenizer: Any,
    prompt: str = "Once upon a time",
    new_tokens: int = 32,
    warmup: int = 1,
    repetitions: int = 3,
    on_run: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Greedy-decoding latency of `model` (HF causal LM, or a logits callable without KV cache).

    `on_run(done, total)` is called after each run, warmup included (progress reporting).
    """
    import torch

    if new_tokens < 2:
        raise InvalidArgument(
            f"latency_new_tokens must be at least 2 (one prefill, one decode), got {new_tokens}"
        )
    if repetitions < 1 or warmup < 0:
        raise InvalidArgument(f"need repetitions >= 1 and warmup >= 0, got {repetitions} and {warmup}")
    prompt_ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]], dtype=torch.long)
    if prompt_ids.shape[1] == 0:
        raise InvalidArgument("latency_prompt is empty")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and prompt_ids.shape[1] + new_tokens > limit:
        raise InvalidArgument(
            f"prompt ({prompt_ids.shape[1]} tokens) + latency_new_tokens ({new_tokens}) exceeds the "
            f"model's context of {limit} tokens"
        )

    kv_cache = isinstance(model, torch.nn.Module)
    ttfts: list[float] = []
    steps: list[float] = []
    totals: list[float] = []
    decode_rates: list[float] = []
    generated: list[int] = []
    with torch.inference_mode():
        for run in range(warmup + repetitions):
            decoder = _KVCacheDecoder(model) if kv_cache else _RecomputeDecoder(logits_fn_for(model))
            ttft, run_steps, generated = _one_run(decoder, prompt_ids, new_tokens)
            if on_run is not None:
                on_run(run + 1, warmup + repetitions)
            if run < warmup:
                continue
            ttfts.append(ttft)
            steps.extend(run_steps)
            totals.append(ttft + sum(run_steps))
            decode_rates.append(len(run_steps) / sum(run_steps))

    per_token = _ms_stats(steps)
    return {
        "prompt_tokens": int(prompt_ids.shape[1]),
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repetitions": repetitions,
        "kv_cache": kv_cache,
        "ttft_ms": _ms_stats(ttfts),
        "per_token_ms": per_token,
        "ms_per_token": per_token["median"],
        # Decode throughput (tokens after the first, per second of decoding), median over runs.
        "tokens_per_s": statistics.median(decode_rates),
        # Whole request: new_tokens over prefill + decode time, median over runs.
        "end_to_end_tokens_per_s": statistics.median(new_tokens / t for t in totals),
        "total_ms": _ms_stats(totals),
        "torch_threads": torch.get_num_threads(),
        # The prompt and its greedy continuation: a quick check that the model is the model it claims.
        "sample": tokenizer.decode(prompt_ids[0].tolist() + generated, skip_special_tokens=True),
    }
