"""Batch-1 greedy decoding with a static KV cache and a compiled, CUDA-graphed decode step.

Hugging Face `generate` with its dynamic cache spends most of a decode step in Python and in launching
many small kernels; at batch 1 on a large GPU that leaves the memory bus idle most of the time. Here the
KV cache is preallocated (static shapes), the one-token step is compiled with
`torch.compile(mode="reduce-overhead")` so it replays as a CUDA graph, and the loop around it is kept
minimal. This is the path the platform uses to measure GPU decode speed (bench/gpu_decode.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class DecodeTiming:
    new_tokens: int
    prefill_ms: float
    per_token_ms: list[float]

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.per_token_ms) / 1000.0
        return len(self.per_token_ms) / total if total else 0.0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_static_cache(model: Any, max_len: int, batch_size: int = 1):
    """A StaticCache across the transformers versions we meet (the constructor changed in 4.5x/5.x)."""
    from transformers import StaticCache

    config, device, dtype = model.config, model.device, model.dtype
    attempts = (
        {
            "config": config,
            "max_cache_len": max_len,
            "device": device,
            "dtype": dtype,
            "max_batch_size": batch_size,
        },
        {"config": config, "max_cache_len": max_len},
        {
            "config": config,
            "max_batch_size": batch_size,
            "max_cache_len": max_len,
            "device": device,
            "dtype": dtype,
        },
    )
    errors = []
    for kwargs in attempts:
        try:
            return StaticCache(**kwargs)
        except TypeError as exc:
            errors.append(str(exc))
    raise RuntimeError(f"cannot build a StaticCache with this transformers: {errors}")


class StaticDecoder:
    """Greedy decoding of an HF causal LM with a static cache of `max_len` positions for `batch_size`
    rows; `compile` compiles the one-token step (CUDA graphs on a GPU with mode "reduce-overhead").

    Either `generate` (the whole run, no host sync between tokens) or `prefill` then `step` per token
    (the benchmarker times each token). One decoder serves many runs: `prefill` resets the cache, and
    the compiled step is built once, so only the first run pays compilation."""

    def __init__(
        self,
        model: Any,
        max_len: int,
        compile: bool = True,
        mode: str = "reduce-overhead",
        batch_size: int = 1,
    ):
        import torch

        self.model = model
        self.max_len = max_len
        self.device = model.device
        self.cache = make_static_cache(model, max_len, batch_size)
        self._position = 0

        def step(input_ids, cache_position):
            logits = self.model(
                input_ids=input_ids,
                position_ids=cache_position.unsqueeze(0),
                cache_position=cache_position,
                past_key_values=self.cache,
                use_cache=True,
                return_dict=False,
            )[0]
            return logits[:, -1].argmax(dim=-1, keepdim=True)

        self._eager_step = step  # also the prefill: prompts vary in length, so it is never compiled
        self._step = torch.compile(step, mode=mode, fullgraph=True) if compile else step
        # Why compiling the step failed (a layer torch.compile cannot trace, e.g. some quantized kernels);
        # the decoder then runs the step eagerly, and says so.
        self.compile_error: str | None = None
        # One position tensor per step, made once: fresh tensors or slices at other storage offsets each
        # step would cost a host-to-device copy or a recompilation.
        self._positions = [torch.tensor([i], device=self.device) for i in range(max_len)]
        self._all_positions = torch.arange(max_len, device=self.device)

    # no_grad, not inference_mode: the cache is allocated lazily on the first call, and inference
    # tensors could not be reset (written in place) afterwards.
    def prefill(self, prompt_ids: Any) -> Any:
        """Reset the cache, run the prompt; the first new token [B, 1] (on the model's device)."""
        import torch

        if prompt_ids.shape[1] >= self.max_len:
            raise ValueError(
                f"the prompt ({prompt_ids.shape[1]} tokens) fills the static cache ({self.max_len})"
            )
        with torch.no_grad():
            self.cache.reset()
            self._position = prompt_ids.shape[1]
            return self._eager_step(prompt_ids.to(self.device), self._all_positions[: self._position])

    def step(self, token: Any) -> Any:
        """The next token [B, 1] after `token` (the last one returned)."""
        import torch

        if self._position >= self.max_len:
            raise ValueError(f"the static cache is full ({self.max_len} positions)")
        position = self._positions[self._position]
        with torch.no_grad():
            try:
                # Clone: a CUDA-graphed output buffer is overwritten by the next replay.
                out = self._step(token, position).clone()
            except Exception as exc:  # compilation fails on the first call, before the cache is written
                if self._step is self._eager_step:
                    raise
                self.compile_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                self._step = self._eager_step
                out = self._step(token, position).clone()
        self._position += 1
        return out

    @property
    def compiled(self) -> bool:
        """Whether the step runs compiled (False when it was not asked for, or compiling failed)."""
        return self._step is not self._eager_step

    def generate(self, prompt_ids, new_tokens: int) -> tuple[list[int], DecodeTiming]:
        """Greedy tokens of the first row and timing. The loop never waits for the GPU between tokens
        (no host sync): the per-token time is the decode phase's wall time divided by its tokens."""
        import torch

        if prompt_ids.shape[1] + new_tokens > self.max_len:
            raise ValueError("prompt + new tokens exceed the static cache length")
        out = torch.empty(new_tokens, dtype=torch.long, device=self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        token = self.prefill(prompt_ids)
        out[0] = token[0, 0]
        _sync(self.device)
        t1 = time.perf_counter()
        for i in range(1, new_tokens):
            token = self.step(token)
            out[i] = token[0, 0]
        _sync(self.device)
        t2 = time.perf_counter()
        steps = new_tokens - 1
        per_token = (t2 - t1) * 1000 / steps if steps else 0.0
        return out.tolist(), DecodeTiming(new_tokens, (t1 - t0) * 1000, [per_token] * steps)
