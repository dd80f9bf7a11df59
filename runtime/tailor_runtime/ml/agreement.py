"""Agreement of a model with its parent (the model it was quantized or exported from).

Over the same sliding windows as perplexity (`tailor_runtime.ml.perplexity.window_spans`, the same
context and stride) and only at the positions perplexity scores, both models give a next-token
distribution. `top1_agreement` is the share of positions where their most likely tokens are the same;
`kl_divergence` is the mean KL(parent || model) in nats, sum_v p(v) (log p(v) - log q(v)) with p the
parent's distribution. Both are cheap (no labels) and sensitive to quantization damage long before
perplexity moves: a model that is its parent gives 1.0 and 0.0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml.perplexity import encode_eval_text, logits_fn_for, window_spans

PROTOCOL = (
    "perplexity's sliding windows and scored positions; top-1 agreement of argmax tokens; "
    "mean KL(reference || model) of next-token distributions, nats"
)


def agreement(
    model: Any,
    reference: Any,
    tokenizer: Any,
    text: str,
    context_length: int,
    stride: int,
    max_tokens: int,
    split_documents: bool = True,
    on_window: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Top-1 agreement and mean KL(reference || model) of next-token distributions over `text`."""
    import torch

    ids, _ = encode_eval_text(tokenizer, text, max_tokens, split_documents)
    stream = torch.tensor(ids, dtype=torch.long)
    spans = window_spans(len(ids), context_length, stride)
    model_fn, reference_fn = logits_fn_for(model), logits_fn_for(reference)
    bos = getattr(tokenizer, "bos_token_id", None)
    same = 0
    kl_sum = 0.0
    kl_max = 0.0
    positions = 0
    for i, (begin, first, end) in enumerate(spans):
        window = stream[begin:end].unsqueeze(0)
        q = model_fn(window)[0, first - 1 - begin : end - 1 - begin].double().log_softmax(-1)
        p = reference_fn(window)[0, first - 1 - begin : end - 1 - begin].double().log_softmax(-1)
        if p.shape[-1] != q.shape[-1]:
            raise InvalidArgument(
                f"the reference model has {p.shape[-1]} logits per token and the model {q.shape[-1]}: "
                "agreement needs the same vocabulary"
            )
        targets = stream[first:end]
        keep = targets != bos if bos is not None else torch.ones_like(targets, dtype=torch.bool)
        kl = (p.exp() * (p - q)).sum(-1)[keep]
        same += int((p.argmax(-1) == q.argmax(-1))[keep].sum())
        kl_sum += kl.sum().item()
        kl_max = max(kl_max, kl.max().item() if kl.numel() else 0.0)
        positions += int(keep.sum())
        if on_window is not None:
            on_window(i + 1, len(spans))
    if positions == 0:
        raise InvalidArgument("the evaluation text has no tokens to compare the models on")
    return {
        "top1_agreement": same / positions,
        "kl_divergence": kl_sum / positions,
        "kl_divergence_max": kl_max,
        "positions": positions,
        "context_length": context_length,
        "stride": stride,
        "max_tokens": max_tokens,
        "protocol": PROTOCOL,
    }
