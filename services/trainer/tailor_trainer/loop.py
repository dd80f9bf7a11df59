"""The training loop every fine-tuning method shares: next-token cross-entropy, AdamW, a schedule,
checkpoints, and progress with step, loss, learning rate, tokens/s and ETA.

Batches come from `batch_at(step)`, a function of the step alone, so a resumed run sees exactly the
batches the interrupted one would have seen; with the optimizer, scheduler and RNG states restored from
the checkpoint, it ends at the same loss.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tailor_runtime.errors import Cancelled, InvalidArgument, ResourceExhausted
from tailor_runtime.progress import ProgressFn

IGNORE = -100


class Checkpointer(Protocol):
    """Where a run keeps its checkpoints (the servicer's is the artifact store)."""

    every: int  # save after every `every` steps (0: never on a timer)

    def restore(self, model: Any, optimizer: Any, scheduler: Any) -> tuple[int, list[float]] | None: ...
    def save(self, step: int, model: Any, optimizer: Any, scheduler: Any, losses: list[float]) -> None: ...
    def draining(self) -> bool: ...  # the worker is shutting down: save now


@dataclass
class LoopResult:
    losses: list[float]
    seconds: float
    real_tokens: int
    resumed_from: int = 0
    eval_loss: float | None = None
    learning_rates: list[float] = field(default_factory=list)


def scheduler_for(optimizer: Any, schedule: str, warmup: int, steps: int):
    """Linear warm-up for `warmup` steps, then constant or cosine decay to 10% at the last step."""
    import torch

    def factor(i: int) -> float:  # i = steps already taken
        if warmup and i < warmup:
            return (i + 1) / warmup
        if schedule == "cosine":
            progress = (i - warmup) / max(1, steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean next-token cross-entropy over the positions that carry a label.

    For decoder models with the usual `.model` + `.lm_head` layout, the output projection runs only on
    those positions: with instruction data (prompts carry no loss) that skips most of the vocabulary-wide
    logits, which at 32k vocabulary are the largest activation of a step (measured on an H100 with a
    7B model: without this the packed run's peak memory was 0.5 GB above plain PEFT's)."""
    import torch

    kwargs = {k: batch[k] for k in ("position_ids", "attention_mask") if k in batch}
    labels = batch["labels"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "model") and hasattr(base, "lm_head"):
        hidden = base.model(input_ids=batch["input_ids"], **kwargs).last_hidden_state
        keep = labels != IGNORE
        if not bool(keep.any()):  # nothing to learn in this batch: a zero that still has a graph
            return hidden.sum() * 0.0
        selected = hidden[keep]
        fused = fused_cross_entropy(base, selected)
        if fused is not None:
            return fused(base.lm_head.weight, selected, labels[keep])
        logits = base.lm_head(selected).float()
        # The model's own forward caps its logits (Gemma 2: cap * tanh(logits / cap)); so does the loss.
        cap = final_logit_softcap(base)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.nn.functional.cross_entropy(logits, labels[keep])
    logits = model(input_ids=batch["input_ids"], **kwargs).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE
    )


# Set on a model by lora.apply_fused_kernels when Liger is installed: batch_loss then uses Liger's fused
# linear + cross-entropy, which computes the logits a chunk of positions at a time and never holds the
# whole [positions x vocabulary] logits, their float32 copy and their gradient at once (measured on an
# H100: the loss's own peak 1,116 -> 488 MB on 2 x 1,024 tokens, 32k vocabulary; BENCHMARKS.md, issue 4).
FUSED_LOSS_ATTR = "_tailor_fused_linear_cross_entropy"


def final_logit_softcap(base: Any) -> float | None:
    """The cap a model applies to its output logits (Gemma 2's final_logit_softcapping), or None."""
    return getattr(getattr(base, "config", None), "final_logit_softcapping", None) or None


@functools.cache
def _liger_loss(softcap: float | None = None) -> Any:
    """One Liger loss module per soft-cap for the process (it holds only its settings)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, softcap=softcap)


def fused_cross_entropy(base: Any, hidden: Any) -> Any:
    """Liger's fused linear cross-entropy for this model and these hidden states, or None where it does
    not apply (not enabled, not on a GPU, or an output head that is not a plain bias-free linear layer in
    the hidden states' dtype)."""
    if not getattr(base, FUSED_LOSS_ATTR, False) or not hidden.is_cuda:
        return None
    head = base.lm_head
    weight = getattr(head, "weight", None)
    if getattr(head, "bias", None) is not None or weight is None or weight.dtype != hidden.dtype:
        return None
    return _liger_loss(final_logit_softcap(base))


def _silent(percent: float, phase: str = "", message: str = "", **metrics: float) -> None:
    """Progress of a rank other than 0: rank 0 reports for the run."""


def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise InvalidArgument(f"training diverged at step {step} (loss {loss}); lower learning_rate")


def evaluate(model: Any, batches: list[dict[str, Any]]) -> float:
    """Mean loss per scored token over `batches` (no gradients)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            n = int((batch["labels"] != IGNORE).sum())
            if n:
                total += batch_loss(model, batch).item() * n
                count += n
    return total / count if count else float("nan")


def train(
    model: Any,
    params: list[Any],
    batch_at: Callable[[int], dict[str, Any]],
    steps: int,
    learning_rate: float,
    progress: ProgressFn,
    *,
    schedule: str = "constant",
    warmup: int = 0,
    checkpointer: Checkpointer | None = None,
    eval_batches: list[dict[str, Any]] | None = None,
    to_device: Callable[[dict[str, Any]], dict[str, Any]] = lambda b: b,
    parallel: Any = None,
) -> LoopResult:
    """Train for `steps` optimizer steps (resuming from the checkpointer's latest state if it has one).

    With `parallel` (a parallel.DataParallel), this process is one rank of a data-parallel run: it trains
    on its shard of each step's batch, gradients are averaged over all labelled tokens of the full batch
    (the step equals the one-process step), rank 0 alone saves checkpoints and reports progress, every
    rank restores from the same checkpoint, and tokens/s counts the whole batch. Rank 0 alone evaluates."""
    import torch

    main = parallel is None or parallel.is_main
    if not main:
        progress = _silent

    # On a GPU, the fused AdamW kernel: faster, and without the foreach implementation's temporary copies
    # of every parameter (measured: 0.2 GB of peak memory on a 7B LoRA run).
    fused = bool(params) and all(p.is_cuda for p in params)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, fused=fused or None)
    scheduler = scheduler_for(optimizer, schedule, warmup, steps)
    losses: list[float] = []
    start = 1
    restored = checkpointer.restore(model, optimizer, scheduler) if checkpointer else None
    if restored is not None:
        done, losses = restored
        start = done + 1
        progress(95.0 * done / steps, "resuming", f"from the checkpoint at step {done}")
    model.train()
    real_tokens = 0
    rates: list[float] = []
    started = time.perf_counter()
    step = start - 1
    try:
        for step in range(start, steps + 1):
            # Before the forward pass, so the last step's gradients are not held through it.
            optimizer.zero_grad(set_to_none=True)
            if parallel is None:
                batch = to_device(batch_at(step))
                loss = batch_loss(model, batch)
                loss_value = loss.item()
                _check_finite(loss_value, step)
                loss.backward()
                step_tokens = int(batch.get("real_tokens", batch["input_ids"].numel()))
            else:
                full = batch_at(step)
                step_tokens = int(full.get("real_tokens", full["input_ids"].numel()))
                batch = to_device(parallel.shard(full))
                labelled = int((batch["labels"] != IGNORE).sum())
                local = 0.0
                if labelled:  # no rows or nothing labelled: zeros, but still part of the all-reduce
                    loss = batch_loss(model, batch)
                    loss.backward()
                    local = loss.item()
                loss_value, _ = parallel.average_gradients(params, labelled, local)
                _check_finite(loss_value, step)  # the same value on every rank: all stop together
            # Clip: an occasional odd batch (the data has some mojibake) must not undo the steps before it.
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            losses.append(float(loss_value))
            real_tokens += step_tokens
            elapsed = max(time.perf_counter() - started, 1e-9)
            done_here = step - start + 1
            if (
                main
                and checkpointer
                and ((checkpointer.every and step % checkpointer.every == 0) or checkpointer.draining())
            ):
                checkpointer.save(step, model, optimizer, scheduler, losses)
            progress(
                95.0 * step / steps,
                "training",
                f"step {step}/{steps}",
                step=step,
                loss=losses[-1],
                learning_rate=rates[-1],
                tokens_per_s=real_tokens / elapsed,
                eta_s=elapsed / done_here * (steps - step),
            )
    except Cancelled:
        # Cancelled (by the user, or by a shutdown past its grace): keep what was learned so far.
        if main and checkpointer and step >= start and losses:
            checkpointer.save(step, model, optimizer, scheduler, losses)
        raise
    except torch.OutOfMemoryError as exc:
        raise ResourceExhausted(
            f"out of GPU memory at step {step}: {str(exc).splitlines()[0]}. Use a smaller batch_size or "
            "seq_len, turn on gradient_checkpointing, or train 4-bit (qlora)"
        ) from None
    seconds = time.perf_counter() - started
    model.eval()
    eval_loss = evaluate(model, [to_device(b) for b in eval_batches]) if eval_batches and main else None
    return LoopResult(losses, seconds, real_tokens, start - 1, eval_loss, rates)
