"""Perplexity of a causal LM on a token stream, with a fixed, stated protocol.

Protocol: the stream is cut into non-overlapping windows of `context` tokens; every token of a window
except the first is predicted from the tokens before it in that window; perplexity = exp(mean NLL) over
all predicted tokens. Non-overlapping windows are what llama2.c's validation loss uses, so the figure is
comparable with its reported val loss (tokens early in a window see little context, which makes it slightly
pessimistic compared with a sliding window).
"""

from __future__ import annotations

import math
from typing import Any


def perplexity(model: Any, token_ids: list[int], context: int = 512, batch_size: int = 8) -> dict[str, float]:
    """{"perplexity", "nll", "tokens"} of `model` on `token_ids` (a tail shorter than 2 tokens is dropped)."""
    import torch

    if context < 2:
        raise ValueError("context must be at least 2 tokens")
    windows = [token_ids[i : i + context] for i in range(0, len(token_ids), context)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("need at least 2 tokens to measure perplexity")
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        # Full windows are batched; a shorter last window goes on its own (no padding, no masks needed).
        groups = [[w] for w in windows if len(w) != context]
        full = [w for w in windows if len(w) == context]
        groups += [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
        for group in groups:
            ids = torch.tensor(group, dtype=torch.long)
            logits = model(input_ids=ids).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": float(total_tokens)}
