"""Does an ONNX decoder compute what its PyTorch source computes? Measured on batches of real text.

Batches have different sizes and lengths and are left-padded (as batched generation pads), so the
check covers the dynamic axes and the attention mask. Two checks per batch, both against the PyTorch
logits of the whole batch (`use_cache=False`):

  prefill  the whole batch in one call, with empty past: every unpadded position;
  decode   the batch without its last `decode_steps` tokens, then those tokens one call each, with the
           previous call's present as past: the token-by-token path generation takes.

Logits are compared only at unpadded positions (what a model outputs at a padded position is
undefined and differs between runtimes): max |difference|, mean |difference| and top-1 agreement.
"""

from __future__ import annotations

from typing import Any

from tailor_runtime.errors import VerificationFailed

# Natural English of the kind small story models are trained on, plus two general sentences.
SAMPLE_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "One day, a small dog found a red ball under the big tree and ran home to show it to his friend.",
    "The sun was warm and the sky was blue.",
    "Tom wanted to help his mom bake a cake, so he washed his hands and got the flour from the shelf.",
    "The weather report said it would rain all afternoon, but the children still went to the beach.",
    "Please read the instructions carefully before you start.",
    "Ben and Mia built a tall tower of blocks. When it fell down, they laughed and built it again.",
)
_BATCH_SIZES = (2, 3, 1)


def sample_batches(tokenizer: Any, count: int) -> list[tuple[Any, Any]]:
    """`count` (input_ids, attention_mask) int64 batches of SAMPLE_TEXT, left-padded, of varied shapes."""
    import torch

    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    batches = []
    start = 0
    for i in range(count):
        size = _BATCH_SIZES[i % len(_BATCH_SIZES)]
        rows = [tokenizer(SAMPLE_TEXT[(start + j) % len(SAMPLE_TEXT)])["input_ids"] for j in range(size)]
        start += size
        width = max(len(r) for r in rows)
        ids = torch.full((size, width), pad, dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[j, width - len(row) :] = 1
        batches.append((ids, mask))
    return batches


def positions_of(mask: Any) -> Any:
    """Position ids of a left-padded batch (what transformers' generate() and OnnxCausalLM use)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def reference_logits(model: Any, input_ids: Any, attention_mask: Any) -> Any:
    """PyTorch logits [B, T, V] as float32 numpy."""
    import torch

    with torch.inference_mode():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_of(attention_mask),
            use_cache=False,
        )
    return out.logits.float().numpy()


class _Tally:
    def __init__(self) -> None:
        self.maxima: list[float] = []
        self.abs_sum, self.agree, self.positions = 0.0, 0, 0

    def add(self, got: Any, want: Any) -> None:
        """`got`, `want`: [positions, vocab] logits at valid positions."""
        import numpy as np

        diff = np.abs(got.astype(np.float64) - want)
        self.maxima.append(float(diff.max()))
        self.abs_sum += float(diff.mean(axis=1).sum())
        self.agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        self.positions += len(got)

    def result(self) -> dict[str, Any]:
        import numpy as np

        return {
            "max_abs_diff": float(np.max(self.maxima)),  # NaN anywhere stays NaN and fails every tolerance
            "mean_abs_diff": self.abs_sum / self.positions,
            "top1_agreement": self.agree / self.positions,
            "positions": self.positions,
        }


def compare(onnx_model: Any, reference: Any, batches: list[tuple[Any, Any]], decode_steps: int = 3) -> dict:
    """`onnx_model` (an OnnxCausalLM) against the PyTorch `reference`: prefill, decode and overall."""
    import torch

    prefill, decode = _Tally(), _Tally()
    with torch.inference_mode():
        for ids, mask in batches:
            want = reference_logits(reference, ids, mask)
            got = onnx_model(input_ids=ids, attention_mask=mask).logits.numpy()
            if got.shape != want.shape:
                raise VerificationFailed(
                    f"the ONNX graph returned logits of shape {got.shape}, PyTorch {want.shape}"
                )
            valid = mask.numpy().astype(bool)
            prefill.add(got[valid], want[valid])
            width = ids.shape[1]
            start = width - min(decode_steps, width - 1)
            out = onnx_model(input_ids=ids[:, :start], attention_mask=mask[:, :start], use_cache=True)
            for t in range(start, width):
                out = onnx_model(
                    input_ids=ids[:, t : t + 1],
                    attention_mask=mask[:, : t + 1],
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
                rows = valid[:, t]
                decode.add(out.logits[:, 0].numpy()[rows], want[:, t][rows])
    checks = {"prefill": prefill.result(), "decode": decode.result()}
    overall = {
        "max_abs_diff": max(c["max_abs_diff"] for c in checks.values()),
        "top1_agreement": min(c["top1_agreement"] for c in checks.values()),
        "positions": sum(c["positions"] for c in checks.values()),
    }
    return {**overall, **checks}


def enforce(
    name: str,
    check: dict[str, Any],
    atol: float,
    min_top1: float,
    *,
    what: str = "the ONNX model",
    scope: str = ", with and without past",
    more_failures: tuple[str, ...] = (),
) -> None:
    """Record the tolerance in `check` and raise VerificationFailed, with the numbers, when over it (or
    when a format's own rules found `more_failures`). Every export format verifies through this."""
    failures = []
    if not check["max_abs_diff"] <= atol:  # written so that NaN fails too
        failures.append(f"max |logit difference| {check['max_abs_diff']:.3g} > atol {atol:g}")
    if not check["top1_agreement"] >= min_top1:
        failures.append(f"top-1 agreement {check['top1_agreement']:.4f} < {min_top1:g}")
    failures += more_failures
    check.update(atol=atol, min_top1_agreement=min_top1, passed=not failures)
    if failures:
        raise VerificationFailed(
            f"{what} does not compute what its source computes ({name} check over "
            f"{check['positions']} positions{scope}): {'; '.join(failures)}; nothing was published"
        )
