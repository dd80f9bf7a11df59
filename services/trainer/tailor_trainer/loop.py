"""The training loop every fine-tuning method shares: next-token cross-entropy on sampled windows."""

from __future__ import annotations

import math
import time
from typing import Any

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.progress import ProgressFn


def train_steps(
    model: Any, params: list[Any], sampler: Any, steps: int, learning_rate: float, progress: ProgressFn
) -> tuple[list[float], float]:
    """AdamW on `params` for `steps` batches from `sampler`; (loss per step, seconds). Leaves eval mode."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    model.train()
    losses: list[float] = []
    tokens_per_step = sampler.batch_size * sampler.seq_len
    started = time.perf_counter()
    for step in range(1, steps + 1):
        inputs, targets_ids = sampler.next_batch()
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets_ids.reshape(-1)
        )
        if not math.isfinite(loss.item()):
            raise InvalidArgument(
                f"training diverged at step {step} (loss {loss.item()}); lower learning_rate"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Clip: an occasional odd batch (the data has some mojibake) must not undo the steps before it.
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        optimizer.step()
        losses.append(float(loss.item()))
        tokens_per_s = step * tokens_per_step / max(time.perf_counter() - started, 1e-9)
        progress(
            95.0 * step / steps,
            "training",
            f"step {step}/{steps}",
            loss=losses[-1],
            tokens_per_s=tokens_per_s,
        )
    model.eval()
    return losses, time.perf_counter() - started
