"""Task metrics beyond perplexity: multiple choice by log-likelihood, and generation against a reference.

Multiple choice (SST-2 here, as in GPT-3 and lm-evaluation-harness): each example is a context and a
set of continuations; the model picks the continuation with the highest total log-likelihood given the
context (`accuracy`), or per character of the continuation (`accuracy_norm`). As in the harness, the
continuation's tokens are those of `context + continuation` after the context's own tokens.

Generation: the first `prompt_tokens` tokens of each evaluation document are the prompt; the model
continues greedily for `new_tokens` tokens (EOS ignored), and its text is compared with the document's
own next `new_tokens` tokens: exact match (whitespace-stripped strings), corpus BLEU (sacrebleu, its
default 13a tokenization) and mean ROUGE-L F1 (Google's rouge-score, with stemming).
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.ml.perplexity import encode_eval_text, logits_fn_for

SST2_TEMPLATE = "Review: {sentence}\nSentiment:"
SST2_CHOICES = (" negative", " positive")  # label 0, label 1


def read_sst2(path: Path, max_examples: int) -> list[tuple[str, list[str], int]]:
    """(context, continuations, index of the right one) from a GLUE SST-2 TSV (`sentence\\tlabel`)."""
    examples = []
    with Path(path).open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not reader.fieldnames or not {"sentence", "label"} <= set(reader.fieldnames):
            raise InvalidArgument(f"{Path(path).name}: expected a TSV with the columns sentence and label")
        for row in reader:
            if len(examples) >= max_examples:
                break
            examples.append((SST2_TEMPLATE.format(sentence=row["sentence"].strip()), list(SST2_CHOICES),
                             int(row["label"])))  # fmt: skip
    if not examples:
        raise InvalidArgument(f"{Path(path).name} has no examples")
    return examples


def _continuation_logprob(
    logits_fn: Any, tokenizer: Any, context: str, continuation: str, limit: int
) -> float:
    import torch

    context_ids = encode_eval_text(tokenizer, context, 10**9, split_documents=False)[0]
    whole = encode_eval_text(tokenizer, context + continuation, 10**9, split_documents=False)[0]
    n = len(whole) - len(context_ids)
    if n < 1:
        raise InvalidArgument(f"continuation {continuation!r} has no tokens of its own")
    ids = torch.tensor([whole[-limit:]], dtype=torch.long)  # keep the end: the continuation is scored
    logp = logits_fn(ids)[0].double().log_softmax(-1)
    targets = ids[0, -n:]
    return logp[-n - 1 : -1].gather(-1, targets[:, None]).sum().item()


def multiple_choice(
    model: Any,
    tokenizer: Any,
    examples: list[tuple[str, list[str], int]],
    on_example: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Accuracy of picking the right continuation by log-likelihood (and per character)."""
    logits_fn = logits_fn_for(model)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    right = right_norm = 0
    for i, (context, choices, label) in enumerate(examples):
        scores = [_continuation_logprob(logits_fn, tokenizer, context, c, limit) for c in choices]
        right += max(range(len(choices)), key=scores.__getitem__) == label
        right_norm += max(range(len(choices)), key=lambda k: scores[k] / len(choices[k])) == label
        if on_example is not None:
            on_example(i + 1, len(examples))
    return {
        "accuracy": right / len(examples),
        "accuracy_norm": right_norm / len(examples),
        "examples": len(examples),
        "chance": statistics.fmean(1 / len(ex[1]) for ex in examples),
        "template": SST2_TEMPLATE,
        "choices": list(SST2_CHOICES),
    }


def generation(
    model: Any,
    tokenizer: Any,
    text: str,
    examples: int,
    prompt_tokens: int,
    new_tokens: int,
    on_example: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Greedy continuations of eval documents scored against the documents' own text."""
    import sacrebleu
    import torch
    from rouge_score import rouge_scorer

    from tailor_benchmarker.latency import greedy_decoder
    from tailor_runtime.ml.text import split_stories

    cases = []
    for document in split_stories(text):
        ids = encode_eval_text(tokenizer, document, prompt_tokens + 1 + new_tokens, split_documents=False)[0]
        if len(ids) == prompt_tokens + 1 + new_tokens:  # BOS, the prompt, the reference
            cases.append((ids[: prompt_tokens + 1], ids[prompt_tokens + 1 :]))
        if len(cases) == examples:
            break
    if not cases:
        raise InvalidArgument(f"no evaluation document has {prompt_tokens + new_tokens} tokens")
    predictions, references = [], []
    with torch.inference_mode():
        for i, (prompt, reference) in enumerate(cases):
            decoder = greedy_decoder(model)
            token = decoder.prefill(torch.tensor([prompt], dtype=torch.long))
            generated = [int(token)]
            while len(generated) < new_tokens:
                token = decoder.step(token)
                generated.append(int(token))
            predictions.append(tokenizer.decode(generated, skip_special_tokens=True).strip())
            references.append(tokenizer.decode(reference, skip_special_tokens=True).strip())
            if on_example is not None:
                on_example(i + 1, len(cases))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge_l = [scorer.score(r, p)["rougeL"].fmeasure for r, p in zip(references, predictions, strict=True)]
    return {
        "exact_match": sum(p == r for p, r in zip(predictions, references, strict=True)) / len(cases),
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "rouge_l": statistics.fmean(rouge_l),
        "examples": len(cases),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "sample": {"prediction": predictions[0], "reference": references[0]},
    }
