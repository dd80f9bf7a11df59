"""Perplexity of a causal LM on held-out text, with the sliding-window protocol.

Windows. As in the Hugging Face guide ("Perplexity of fixed-length models"): windows of
`context_length` tokens start every `stride` tokens, and each window scores only the tokens that the
previous window did not score; the tokens before them are context only. With `stride <
context_length` every token is scored once, with at least `context_length - stride` tokens of context
(except near the start). With `stride == context_length` the windows do not overlap and, as in the
guide, the first token of every window is not scored (nothing precedes it inside the window).

BOS. With `split_documents` (the default) the text is read the way Tailor reads corpora
(`tailor_runtime.ml.text`: documents separated by blank lines) and every document is encoded starting
with BOS, which is how llama2.c and most pretraining pipelines separate documents. Without it, the
whole text is one document with one BOS. A BOS is prepended when the tokenizer does not add it itself
(tokenizers without a BOS token get none). BOS tokens are context only: they are never scored, so
`tokens_scored` counts text tokens and the figure does not reward predicting document boundaries.

`model` is a Hugging Face causal LM (torch.nn.Module) or any callable mapping int64 input_ids [1, T]
(torch) to logits [1, T, V] (used for ONNX Runtime sessions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tailor_runtime.errors import InvalidArgument

PROTOCOL = (
    "sliding window (HF guide): each window scores only tokens the previous one did not; "
    "BOS starts each document (or the whole text) and is never scored"
)
# Without document splitting, a large file is tokenized by prefix (cut at whitespace; ~4 characters
# per English token, guess 8) and kept only with a margin of extra tokens, so the cut cannot change
# the tokens that are used.
_CHARS_PER_TOKEN_GUESS = 8
_CUT_MARGIN_TOKENS = 64

LogitsFn = Callable[[Any], Any]


def logits_fn_for(model: Any) -> LogitsFn:
    """A callable input_ids [B, T] -> float logits [B, T, V] for an HF causal LM or a callable. A model
    on a GPU gets its ids moved there and gives its logits back on the CPU, where the metrics are
    computed (float64 sums), so callers never see devices."""
    import torch

    if isinstance(model, torch.nn.Module):
        device = model_device(model)

        def run(input_ids: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(input_ids=input_ids.to(device), use_cache=False).logits.cpu()

        return run
    if callable(model):
        return model
    raise InvalidArgument(f"cannot compute logits with a {type(model).__name__}")


def model_device(model: Any) -> Any:
    """The device a torch model's weights are on (its first parameter's, or buffer's)."""
    import torch

    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _encode(tokenizer: Any, text: str) -> list[int]:
    """`text` encoded with a leading BOS whenever the tokenizer has one."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


def encode_eval_text(
    tokenizer: Any, text: str, max_tokens: int, split_documents: bool = True
) -> tuple[list[int], bool]:
    """(the first `max_tokens` tokens of the eval stream, whether the text was cut short)."""
    if split_documents:
        from tailor_runtime.ml.text import split_stories

        ids: list[int] = []
        for document in split_stories(text):
            ids.extend(_encode(tokenizer, document))
            if len(ids) >= max_tokens:
                # Reaching the limit counts as cut short, even where it falls exactly on the last token.
                return ids[:max_tokens], True
        return ids, False
    chars = max(1024, max_tokens * _CHARS_PER_TOKEN_GUESS)
    while True:
        whole = chars >= len(text)
        cut = max(text.rfind(" ", 0, chars), text.rfind("\n", 0, chars))
        ids = _encode(tokenizer, text if whole else text[: cut if cut > 0 else chars])
        if whole or len(ids) > max_tokens + _CUT_MARGIN_TOKENS:
            return ids[:max_tokens], len(ids) > max_tokens or not whole
        chars *= 2


def window_spans(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first_target, end) per window: the window is ids[begin:end], its targets ids[first_target:end]."""
    spans = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        # A token needs at least one earlier token in its window to be predicted.
        first = max(prev_end, begin + 1)
        if first < end:
            spans.append((begin, first, end))
        prev_end = end
        if end == n_tokens:
            break
    return spans


def sliding_window_nll(
    logits_fn: LogitsFn,
    ids: list[int],
    context_length: int,
    stride: int,
    skip_token: int | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> tuple[float, int, int]:
    """(sum of NLL in nats, tokens scored, windows) over the stream `ids`; `skip_token` is never a target."""
    import torch

    stream = torch.tensor(ids, dtype=torch.long)
    spans = window_spans(len(ids), context_length, stride)
    nll_sum = 0.0  # a Python float (float64): thousands of windows do not lose precision
    scored = 0
    for i, (begin, first, end) in enumerate(spans):
        logits = logits_fn(stream[begin:end].unsqueeze(0))[0]
        # Logits at position p predict token p + 1.
        pred = logits[first - 1 - begin : end - 1 - begin].float()
        targets = stream[first:end]
        nll = torch.nn.functional.cross_entropy(pred, targets, reduction="none")
        keep = targets != skip_token if skip_token is not None else torch.ones_like(targets, dtype=torch.bool)
        nll_sum += nll[keep].double().sum().item()
        scored += int(keep.sum())
        if on_window is not None:
            on_window(i + 1, len(spans))
    return nll_sum, scored, len(spans)


def perplexity(
    model: Any,
    tokenizer: Any,
    text: str,
    context_length: int = 256,
    stride: int = 128,
    max_tokens: int = 8192,
    split_documents: bool = True,
    on_window: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Sliding-window perplexity of `model` on the first `max_tokens` tokens of `text`.

    `on_window(done, total)` is called after each window (progress reporting).
    """
    if context_length < 2:
        raise InvalidArgument(f"context_length must be at least 2, got {context_length}")
    if not 1 <= stride <= context_length:
        raise InvalidArgument(f"stride must be between 1 and context_length ({context_length}), got {stride}")
    if max_tokens < 2:
        raise InvalidArgument(f"max_eval_tokens must be at least 2, got {max_tokens}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and context_length > limit:
        raise InvalidArgument(
            f"context_length {context_length} exceeds the model's context of {limit} tokens"
        )

    ids, truncated = encode_eval_text(tokenizer, text, max_tokens, split_documents)
    bos = getattr(tokenizer, "bos_token_id", None)
    nll_sum, scored, windows = sliding_window_nll(
        logits_fn_for(model), ids, context_length, stride, skip_token=bos, on_window=on_window
    )
    if scored == 0:
        raise InvalidArgument("the evaluation text has no tokens to score (it is empty or too short)")
    mean_nll = nll_sum / scored
    return {
        "perplexity": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "tokens_scored": scored,
        "tokens_total": len(ids),
        "windows": windows,
        "context_length": context_length,
        "stride": stride,
        "max_tokens": max_tokens,
        "split_documents": split_documents,
        "text_truncated": truncated,
        "protocol": PROTOCOL,
    }
