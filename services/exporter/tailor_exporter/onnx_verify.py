"""Does an ONNX graph compute what its PyTorch source computes? Measured on batches of real text.

Batches have different sizes and lengths and are left-padded (as batched generation pads), so the
check covers the dynamic axes and the attention mask. Logits are compared only at unpadded
positions: what a model outputs at a padded position is undefined and differs between runtimes.
"""

from __future__ import annotations

from pathlib import Path
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


def reference_logits(model: Any, input_ids: Any, attention_mask: Any) -> Any:
    """PyTorch logits [B, T, V] as float32 numpy."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits.float().numpy()


def compare_with_onnxruntime(onnx_path: Path, model: Any, batches: list[tuple[Any, Any]]) -> dict[str, Any]:
    """max_abs_diff, mean_abs_diff and top1_agreement of the ONNX graph against `model` over `batches`."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    maxima, abs_sum, agree, positions = [], 0.0, 0, 0
    for ids, mask in batches:
        want = reference_logits(model, ids, mask)
        got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        if got.shape != want.shape:
            raise VerificationFailed(
                f"the ONNX graph returned logits of shape {got.shape}, PyTorch {want.shape}"
            )
        valid = mask.numpy().astype(bool)
        diff = np.abs(got[valid].astype(np.float64) - want[valid])
        maxima.append(diff.max())
        abs_sum += float(diff.mean(axis=1).sum())
        agree += int((got[valid].argmax(-1) == want[valid].argmax(-1)).sum())
        positions += int(valid.sum())
    return {
        "max_abs_diff": float(np.max(maxima)),  # NaN anywhere stays NaN, and then fails every tolerance
        "mean_abs_diff": abs_sum / positions,
        "top1_agreement": agree / positions,
        "positions": positions,
    }
