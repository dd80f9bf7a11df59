"""The accuracy gate: a quantized model is measured against its parent before it may be published.

Both models are scored on the same held-out text with the benchmarker's own sliding-window perplexity
and agreement code (`tailor_runtime.ml`), with the benchmark's protocol: its defaults (8,192 tokens,
windows of 256 every 128, `tailor_runtime.metrics_catalogue`), or the pipeline's benchmark config, which
the gateway sends, so the gate's "+x%" and the report's table are measured on the same tokens: perplexity of each, its relative increase, top-1 next-token
agreement and mean KL(parent || quantized). The run fails with AccuracyGateFailed (FAILED_PRECONDITION)
and these numbers when the increase exceeds the threshold (default 5%) or the agreement is below the
requested minimum; the output folder is then discarded, so nothing is published.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailor_runtime import metrics_catalogue as mc
from tailor_runtime.errors import AccuracyGateFailed, InvalidArgument

DEFAULT_MAX_PPL_INCREASE_PCT = 5.0
# The benchmark's: until both used these, NF4 read +17.55% at the gate (4,096 tokens, windows of 512)
# beside +10.9% against the report's baseline (8,192 tokens, windows of 256).
DEFAULT_EVAL_TOKENS = mc.PERPLEXITY_EVAL_TOKENS
DEFAULT_CONTEXT_LENGTH = mc.PERPLEXITY_CONTEXT_LENGTH
DEFAULT_STRIDE = mc.PERPLEXITY_STRIDE
MIN_EVAL_TOKENS = 256


@dataclass(frozen=True)
class GateSettings:
    max_perplexity_increase_pct: float = DEFAULT_MAX_PPL_INCREASE_PCT
    min_top1_agreement: float | None = None
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    disabled: bool = False
    context_length: int = DEFAULT_CONTEXT_LENGTH
    stride: int = DEFAULT_STRIDE
    split_documents: bool = True

    @classmethod
    def from_proto(cls, gate: Any) -> GateSettings:
        settings = cls(
            max_perplexity_increase_pct=(
                gate.max_perplexity_increase_pct
                if gate.HasField("max_perplexity_increase_pct")
                else DEFAULT_MAX_PPL_INCREASE_PCT
            ),
            min_top1_agreement=gate.min_top1_agreement if gate.HasField("min_top1_agreement") else None,
            eval_tokens=gate.eval_tokens or DEFAULT_EVAL_TOKENS,
            disabled=gate.disabled,
            context_length=gate.context_length or DEFAULT_CONTEXT_LENGTH,
            stride=gate.stride or DEFAULT_STRIDE,
            split_documents=gate.split_documents if gate.HasField("split_documents") else True,
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        if not 0 <= self.max_perplexity_increase_pct <= 1000:
            raise InvalidArgument(
                f"gate.max_perplexity_increase_pct must be between 0 and 1000, got {self.max_perplexity_increase_pct}"
            )
        if self.min_top1_agreement is not None and not 0 <= self.min_top1_agreement <= 1:
            raise InvalidArgument(
                f"gate.min_top1_agreement must be between 0 and 1, got {self.min_top1_agreement}"
            )
        if not MIN_EVAL_TOKENS <= self.eval_tokens <= 1_000_000:
            raise InvalidArgument(
                f"gate.eval_tokens must be between {MIN_EVAL_TOKENS} and 1000000, got {self.eval_tokens}"
            )
        if not 2 <= self.context_length <= 131_072:
            raise InvalidArgument(
                f"gate.context_length must be between 2 and 131072, got {self.context_length}"
            )
        if not 1 <= self.stride <= self.context_length:
            raise InvalidArgument(
                f"gate.stride must be between 1 and context_length ({self.context_length}), got {self.stride}"
            )

    def as_recipe(self) -> dict[str, Any]:
        return {
            "max_perplexity_increase_pct": self.max_perplexity_increase_pct,
            "min_top1_agreement": self.min_top1_agreement,
            "eval_tokens": self.eval_tokens,
            "disabled": self.disabled,
            "context_length": self.context_length,
            "stride": self.stride,
            "split_documents": self.split_documents,
        }


def _place_on(model: Any, device: str) -> None:
    """Move `model` to `device` where it runs there; models that only run on CPU (torch.ao dynamic int8)
    stay there whatever the worker has."""
    if device == "cpu":
        return
    try:
        model.to(device)
    except (RuntimeError, ValueError, NotImplementedError):
        pass


def measure(
    parent_dir: Path,
    child_dir: Path,
    text: str,
    eval_tokens: int,
    device: str = "cpu",
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    stride: int = DEFAULT_STRIDE,
    split_documents: bool = True,
) -> dict:
    """Perplexity of parent and child on `text` (the first `eval_tokens`, windows of `context_length`
    every `stride`, as the benchmark measures), the increase, top-1 agreement and KL."""
    from tailor_runtime.ml.agreement import agreement
    from tailor_runtime.ml.model_io import load_causal_lm
    from tailor_runtime.ml.perplexity import logits_fn_for, perplexity

    parent, tokenizer = load_causal_lm(parent_dir)
    child, _ = load_causal_lm(child_dir)
    limit = getattr(parent.config, "max_position_embeddings", None) or 2048
    context = min(context_length, limit)  # the benchmark refuses a longer context; the gate still runs
    stride = min(stride, context)
    # Each model goes to the worker's device where it can; logits_fn_for feeds it there and brings the
    # logits back to the CPU, where the metrics are summed.
    _place_on(parent, device)
    _place_on(child, device)
    parent_fn, child_fn = logits_fn_for(parent), logits_fn_for(child)
    windows = {"context_length": context, "stride": stride, "max_tokens": eval_tokens}
    p = perplexity(parent_fn, tokenizer, text, split_documents=split_documents, **windows)
    c = perplexity(child_fn, tokenizer, text, split_documents=split_documents, **windows)
    a = agreement(child_fn, parent_fn, tokenizer, text, context, stride, eval_tokens, split_documents)
    increase = 100.0 * (c["perplexity"] / p["perplexity"] - 1.0)
    return {
        "parent_perplexity": p["perplexity"],
        "perplexity": c["perplexity"],
        "perplexity_increase_pct": increase,
        "top1_agreement": a["top1_agreement"],
        "kl_divergence": a["kl_divergence"],
        "gate_tokens_scored": c["tokens_scored"],
        "gate_context_length": context,
        "gate_stride": stride,
    }


def enforce(settings: GateSettings, metrics: dict[str, Any], method: str) -> dict[str, Any]:
    """`metrics` plus the verdict; AccuracyGateFailed with the numbers when the result lost too much."""
    reasons = []
    if metrics["perplexity_increase_pct"] > settings.max_perplexity_increase_pct:
        reasons.append(
            f"perplexity {metrics['perplexity']:.4f} is {metrics['perplexity_increase_pct']:+.2f}% against the "
            f"parent's {metrics['parent_perplexity']:.4f} (allowed: +{settings.max_perplexity_increase_pct:g}%)"
        )
    if settings.min_top1_agreement is not None and metrics["top1_agreement"] < settings.min_top1_agreement:
        reasons.append(
            f"top-1 agreement with the parent {metrics['top1_agreement']:.4f} is below "
            f"{settings.min_top1_agreement:g}"
        )
    verdict = {
        **metrics,
        "gate": "rejected" if reasons else "passed",
        "gate_max_perplexity_increase_pct": settings.max_perplexity_increase_pct,
    }
    if reasons:
        raise AccuracyGateFailed(
            f"accuracy gate rejected {method}: {'; '.join(reasons)}; nothing was published. Try more bits, a "
            "calibrated method (gptq, awq) or a looser gate.max_perplexity_increase_pct",
            verdict,
        )
    return verdict
