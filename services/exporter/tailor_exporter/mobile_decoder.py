"""The decoder that mobile exports (ExecuTorch, Core ML) compile: a Llama with a static KV cache.

    forward(input_ids [1, T] int64, input_pos [T] int64) -> logits [1, T, vocab] float32

One call takes 1 to `max_seq_len` tokens at the positions `input_pos` (consecutive, each < max_seq_len):
the whole prompt in one call (prefill), then one token per call (decode). The keys and values of every
call are written into per-layer cache buffers of a fixed shape [1, kv_heads, max_seq_len, head_dim], which
the exported program mutates in place: ExecuTorch keeps them as mutable buffers in the .pte's memory
plan, Core ML as model states (iOS 18 / macOS 15). Attention always spans the whole cache, with the slots
after each query's position masked, so a new sequence simply starts again at position 0.

The layers are the source model's own modules (embedding, RMSNorms, projections, MLP, output head) and
the RoPE tables are computed once by its own rotary embedding (any RoPE scaling included); what is new
here is the cache and the attention over it, written with ops that both XNNPACK and Core ML's converter
take (a one-hot matmul and a select write the cache: no index_copy, which coremltools cannot convert).
A call whose first position is p keeps the slots before p and clears the rest, so positions must run
on from the previous call (or restart at 0, which starts a new sequence), and nothing depends on what
the cache memory held before the first call. Everything is verified against the source's own forward
before an export is published (see compare_stepwise).
"""

from __future__ import annotations

from typing import Any

from tailor_runtime.errors import InvalidArgument

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def check_architecture(config: dict[str, Any], target: str) -> None:
    """InvalidArgument naming the supported architectures unless `config` (config.json) is one of them."""
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES or config.get("model_type") != "llama":
        raise InvalidArgument(
            f"cannot export {arch} (model_type {config.get('model_type')!r}) to {target}: its static-cache "
            f"decoder is written for Llama attention; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def decoder_class() -> type:
    import torch
    from torch import nn

    class StaticCacheDecoder(nn.Module):
        """`lm` (a float LlamaForCausalLM) with a KV cache of `max_seq_len` slots per layer."""

        def __init__(self, lm: Any, max_seq_len: int, cache_dtype: Any = torch.float32):
            super().__init__()
            config = lm.config
            self.lm = lm
            self.heads = config.num_attention_heads
            self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
            self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
            self.max_seq_len = max_seq_len
            with torch.no_grad():
                probe = torch.zeros(1, max_seq_len, 1)
                cos, sin = lm.model.rotary_emb(probe, torch.arange(max_seq_len)[None])
            self.register_buffer("rope_cos", cos[0].float().clone(), persistent=False)
            self.register_buffer("rope_sin", sin[0].float().clone(), persistent=False)
            self.register_buffer("slots", torch.arange(max_seq_len), persistent=False)
            shape = (1, self.kv_heads, max_seq_len, self.head_dim)
            for i in range(len(lm.model.layers)):
                self.register_buffer(f"k_cache_{i}", torch.zeros(shape, dtype=cache_dtype), persistent=False)
                self.register_buffer(f"v_cache_{i}", torch.zeros(shape, dtype=cache_dtype), persistent=False)

        @staticmethod
        def _rope(x: Any, cos: Any, sin: Any) -> Any:
            half = x.shape[-1] // 2
            return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

        def _write(self, name: str, new: Any, write_t: Any, written: Any, live: Any) -> Any:
            """The cache `name` with the rows `new` [1, kv_heads, T, D] at the slots one-hot in `write_t`,
            the earlier slots of this sequence (`live`) as they were, and every other slot zero.

            Selected, never multiplied: ExecuTorch leaves a mutable buffer's first contents undefined
            (they may hold NaN bit patterns, and NaN * 0 is NaN), so nothing of a slot is used before
            this sequence wrote it; a sequence starting at position 0 wipes the previous one.
            """
            cache = getattr(self, name)
            scattered = torch.matmul(write_t, new)  # the new rows at their slots, 0 elsewhere
            kept = torch.where(live, cache.to(new.dtype), torch.zeros_like(scattered))  # (no scalar: Core ML)
            updated = torch.where(written, scattered, kept)
            cache.copy_(updated.to(cache.dtype))
            return updated

        def forward(self, input_ids: Any, input_pos: Any) -> Any:
            tokens = input_ids.shape[1]
            hidden = self.lm.model.embed_tokens(input_ids)
            cos = self.rope_cos[input_pos][None, None]  # [1, 1, T, D]
            sin = self.rope_sin[input_pos][None, None]
            write = (self.slots[None, :] == input_pos[:, None]).to(hidden.dtype)  # [T, slots]
            write_t = write.t()
            written = (write.sum(0) > 0)[None, None, :, None]  # [1, 1, slots, 1]
            live = (self.slots < input_pos[0])[None, None, :, None]  # written by earlier calls
            visible = self.slots[None, :] <= input_pos[:, None]
            mask = torch.where(visible, 0.0, float("-inf"))[None, None]  # [1, 1, T, slots]
            groups = self.heads // self.kv_heads
            for i, layer in enumerate(self.lm.model.layers):
                attn = layer.self_attn
                h = layer.input_layernorm(hidden)
                q = attn.q_proj(h).view(1, tokens, self.heads, self.head_dim).transpose(1, 2)
                k = attn.k_proj(h).view(1, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
                v = attn.v_proj(h).view(1, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
                q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
                keys = self._write(f"k_cache_{i}", k, write_t, written, live)
                values = self._write(f"v_cache_{i}", v, write_t, written, live)
                if groups > 1:
                    keys = keys.repeat_interleave(groups, dim=1)
                    values = values.repeat_interleave(groups, dim=1)
                scores = torch.matmul(q, keys.transpose(2, 3)) * attn.scaling + mask
                out = torch.matmul(torch.softmax(scores, dim=-1), values)
                hidden = hidden + attn.o_proj(
                    out.transpose(1, 2).reshape(1, tokens, self.heads * self.head_dim)
                )
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            return self.lm.lm_head(self.lm.model.norm(hidden))

    return StaticCacheDecoder


def export_program(
    float_model: Any, max_seq_len: int, cache_dtype: str = "float32", tool: str = "torch.export"
):
    """torch.export of the static-cache decoder of `float_model`, T dynamic in [1, max_seq_len]."""
    import torch
    from torch.export import Dim

    from tailor_runtime.errors import FailedPrecondition

    decoder = decoder_class()(float_model, max_seq_len, getattr(torch, cache_dtype)).eval()
    tokens = Dim("tokens", min=1, max=max_seq_len)
    sample = torch.arange(1, 4, dtype=torch.long)[None] % float_model.config.vocab_size
    try:
        with torch.no_grad():
            return torch.export.export(
                decoder,
                (sample, torch.arange(3, dtype=torch.long)),
                dynamic_shapes=({1: tokens}, {0: tokens}),
                strict=False,
            )
    except Exception as exc:
        raise FailedPrecondition(
            f"torch.export could not export this model for {tool}: {first_line(exc)}"
        ) from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def sample_sequences(tokenizer: Any, count: int, max_len: int) -> list[list[int]]:
    """`count` token sequences of real text (batch 1: on-device generation runs one sequence)."""
    from tailor_runtime.ml.onnx.verify import SAMPLE_TEXT

    return [tokenizer(SAMPLE_TEXT[i % len(SAMPLE_TEXT)])["input_ids"][:max_len] for i in range(count)]


class _Tally:
    def __init__(self) -> None:
        self.max, self.abs_sum, self.agree, self.positions = 0.0, 0.0, 0, 0

    def add(self, got: Any, want: Any) -> None:
        """`got`, `want`: [positions, vocab] logits."""
        import numpy as np

        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        self.max = max(self.max, float(diff.max())) if np.isfinite(diff).all() else float("nan")
        self.abs_sum += float(diff.mean(axis=1).sum())
        self.agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        self.positions += len(got)

    def result(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max,
            "mean_abs_diff": self.abs_sum / self.positions,
            "top1_agreement": self.agree / self.positions,
            "positions": self.positions,
        }


def reference_logits(model: Any, ids: list[int]) -> Any:
    """The source's own forward, no cache: [T, vocab] float32 numpy."""
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def compare_stepwise(step: Any, reference: Any, sequences: list[list[int]], decode_steps: int = 3) -> dict:
    """`step(input_ids [1, T], input_pos [T]) -> logits [T, vocab] numpy` against the source's forward.

    Per sequence: all but the last `decode_steps` tokens in one call (prefill), then those one call each
    (decode), in one state: the cache the previous sequence left behind must not leak into the next.
    """
    import torch

    prefill, decode = _Tally(), _Tally()
    for ids in sequences:
        want = reference_logits(reference, ids)
        start = len(ids) - min(decode_steps, len(ids) - 1)
        got = step(torch.tensor([ids[:start]]), torch.arange(start))
        prefill.add(got, want[:start])
        for t in range(start, len(ids)):
            decode.add(step(torch.tensor([ids[t : t + 1]]), torch.tensor([t])), want[t : t + 1])
    checks = {"prefill": prefill.result(), "decode": decode.result()}
    return {
        "max_abs_diff": max(c["max_abs_diff"] for c in checks.values()),
        "top1_agreement": min(c["top1_agreement"] for c in checks.values()),
        "positions": sum(c["positions"] for c in checks.values()),
        **checks,
    }


def program_step(program: Any) -> Any:
    """A step function running an ExportedProgram in PyTorch (its buffers mutated in place)."""
    import torch

    module = program.module()

    def step(ids: Any, pos: Any) -> Any:
        with torch.inference_mode():
            return module(ids, pos)[0].float().numpy()

    return step
