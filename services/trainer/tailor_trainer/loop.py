"""The training loop every fine-tuning method shares: next-token cross-entropy, AdamW, a schedule,
gradient accumulation, checkpoints, evaluation with early stopping, and progress with step, loss,
learning rate, tokens/s and ETA.

Batches come from `batch_at(index)`, a function of the micro-batch index alone (optimizer step s with
k accumulation steps takes micro-batches (s-1)k+1 .. sk), so a resumed run sees exactly the batches the
interrupted one would have seen; with the optimizer, scheduler and RNG states restored from the
checkpoint, it ends at the same loss.

With `eval_every`, the held-out loss is measured every that many steps and at the last one; the weights
of the best evaluation are kept in memory and put back at the end, so what the caller publishes is the
best evaluated model, not the last one; `patience` stops the run after that many evaluations without
improvement.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tailor_runtime.errors import Cancelled, InvalidArgument, ResourceExhausted
from tailor_runtime.progress import ProgressFn

IGNORE = -100


class Checkpointer(Protocol):
    """Where a run keeps its checkpoints (the servicer's is the artifact store)."""

    every: int  # save after every `every` steps (0: never on a timer)

    def restore(
        self, model: Any, optimizer: Any, scheduler: Any
    ) -> tuple[int, list[float], dict[str, Any] | None] | None: ...  # (step, losses, evaluations)
    def save(
        self,
        step: int,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        losses: list[float],
        evaluations: dict[str, Any] | None = None,  # BestWeights.state()
    ) -> None: ...
    def draining(self) -> bool: ...  # the worker is shutting down: save now


@dataclass
class LoopResult:
    losses: list[float]
    seconds: float
    real_tokens: int
    resumed_from: int = 0
    eval_loss: float | None = None  # with evaluations during training: the best one (the kept weights')
    learning_rates: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) per evaluation
    best_step: int | None = None  # the step whose weights the model holds at the end (None: the last)
    stopped_early: bool = False

    @property
    def steps_run(self) -> int:
        return len(self.losses)


SCHEDULES = ("constant", "linear", "cosine")
FINAL_LR_FACTOR = 0.1  # linear and cosine decay to 10% of the learning rate, as LLaMA's recipe does


def lr_factor(i: int, schedule: str, warmup: int, steps: int) -> float:
    """The learning rate of step i + 1 (i = steps already taken) as a share of the configured one:
    linear warm-up over `warmup` steps, then constant, or linear or cosine decay towards 10%."""
    if warmup and i < warmup:
        return (i + 1) / warmup
    progress = min(1.0, (i - warmup) / max(1, steps - warmup))
    if schedule == "cosine":
        return FINAL_LR_FACTOR + (1 - FINAL_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - (1 - FINAL_LR_FACTOR) * progress
    return 1.0


def scheduler_for(optimizer: Any, schedule: str, warmup: int, steps: int):
    """A LambdaLR over `lr_factor` (its position is what a checkpoint keeps)."""
    import torch

    if schedule not in SCHEDULES:
        raise InvalidArgument(f"unknown lr_schedule {schedule!r}", choices=SCHEDULES)

    def factor(i: int) -> float:  # a plain function: LambdaLR's state_dict (the checkpoint) skips it
        return lr_factor(i, schedule, warmup, steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# The flat indices of a batch's labelled positions, found on the host before the batch is copied to the
# GPU (with_label_positions), so that the step's loss selects them without a host synchronisation.
LABEL_POSITIONS = "label_positions"


def with_label_positions(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its labelled positions (on the host, where its labels are) for batch_loss."""
    labels = batch["labels"]
    if labels.is_cuda:
        return batch
    return {**batch, LABEL_POSITIONS: (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)}


def batch_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean next-token cross-entropy over the positions that carry a label.

    For decoder models with the usual `.model` + `.lm_head` layout, the output projection runs only on
    those positions: with instruction data (prompts carry no loss) that skips most of the vocabulary-wide
    logits, which at 32k vocabulary are the largest activation of a step (measured on an H100 with a
    7B model: without this the packed run's peak memory was 0.5 GB above plain PEFT's)."""
    import torch

    from tailor_trainer.speed import FLEX_ATTR, document_block_mask

    kwargs = {k: batch[k] for k in ("position_ids", "attention_mask") if k in batch}
    labels = batch["labels"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, FLEX_ATTR, False) and "position_ids" in batch:
        # FlexAttention: the documents from the position ids, as a BlockMask, instead of the dense mask.
        kwargs["attention_mask"] = document_block_mask(batch["position_ids"])
    if hasattr(base, "model") and hasattr(base, "lm_head"):
        hidden = base.model(input_ids=batch["input_ids"], **kwargs).last_hidden_state
        positions = batch.get(LABEL_POSITIONS)
        if positions is None:  # found here: a boolean index and .any() each wait for the GPU
            positions = (labels.reshape(-1) != IGNORE).nonzero().squeeze(1)
        if positions.numel() == 0:  # nothing to learn in this batch: a zero that still has a graph
            return hidden.sum() * 0.0
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        targets = labels.reshape(-1).index_select(0, positions)
        fused = fused_cross_entropy(base, selected)
        if fused is not None:
            return fused(base.lm_head.weight, selected, targets)
        logits = base.lm_head(selected).float()
        # The model's own forward caps its logits (Gemma 2: cap * tanh(logits / cap)); so does the loss.
        cap = final_logit_softcap(base)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.nn.functional.cross_entropy(logits, targets)
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


def accumulate_gradients(
    model: Any,
    params: list[Any],
    micro_batches: Iterable[dict[str, Any]],
    step: int,
    to_device: Callable[[dict[str, Any]], dict[str, Any]],
    parallel: Any = None,
) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step, leaving in `.grad` the gradient of the
    mean loss over all their labelled positions (what one batch of all those rows would give); returns
    (that mean loss, the real tokens of the step's full batches).

    Each micro-batch's mean loss is weighted by its labelled positions, and the summed gradients are
    divided by the step's total once all are in, so the micro-batches are taken one at a time and never
    held together (long rows carry a [T, T] mask each): pass a generator. A list of one batch is the
    plain backward of its mean loss. With `parallel`, each micro-batch is cut to this rank's shard and
    the ranks' gradients are then combined (`average_gradients`, weighted by each rank's labelled
    positions)."""
    single = isinstance(micro_batches, list | tuple) and len(micro_batches) == 1
    total = tokens = 0
    # The step's loss stays on the device until every backward is queued: reading it (.item()) waits
    # for the GPU, and a wait between forward and backward leaves the GPU idle while the host launches
    # the backward's kernels. It is read once at the end, before the optimizer step.
    losses = []
    for full in micro_batches:
        tokens += int(full.get("real_tokens", full["input_ids"].numel()))
        batch = full if parallel is None else parallel.shard(full)
        n = int((batch["labels"] != IGNORE).sum())
        total += n
        if parallel is not None and not n:
            continue  # nothing labelled here: zeros, and the rank still joins the all-reduce
        loss = batch_loss(model, to_device(with_label_positions(batch)))
        (loss if single else loss * n).backward()
        losses.append(loss.detach() if single else loss.detach() * n)
        del loss, batch
    loss_sum = float(sum(losses)) if losses else 0.0
    if not single and total:
        for param in params:
            if param.grad is not None:
                param.grad.div_(total)
        loss_sum /= total
    if parallel is None:
        # Before the optimizer step, which the caller takes: a diverged loss never reaches the weights.
        _check_finite(loss_sum, step)
        return loss_sum, tokens
    mean, _ = parallel.average_gradients(params, total, loss_sum)
    _check_finite(mean, step)  # the same value on every rank: all stop together
    return mean, tokens


class BestWeights:
    """The evaluations of a run, the best one's trainable weights (a copy in memory), and the
    early-stopping count."""

    def __init__(self, params: list[Any], patience: int):
        self.params, self.patience = params, patience
        self.history: list[tuple[int, float]] = []
        self.best_step: int | None = None
        self.best_loss = math.inf
        self.since_best = 0
        self._copy: list[Any] | None = None

    def record(self, step: int, loss: float) -> bool:
        """Note an evaluation; True when the run should stop (`patience` evaluations without a lower
        loss than the best so far)."""
        self.history.append((step, loss))
        if math.isfinite(loss) and loss < self.best_loss:
            self.best_step, self.best_loss, self.since_best = step, loss, 0
            self._copy = [p.detach().clone() for p in self.params]
        else:
            self.since_best += 1
        return bool(self.patience) and self.since_best >= self.patience

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of the evaluations (None before the first), so a resumed run still
        knows the best evaluation and its weights."""
        if not self.history:
            return None
        return {
            "history": [list(entry) for entry in self.history],
            "best_step": self.best_step,
            "best_loss": self.best_loss if math.isfinite(self.best_loss) else None,
            "since_best": self.since_best,
            "weights": self._copy,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.history = [(int(step), float(loss)) for step, loss in state["history"]]
        self.best_step = state["best_step"]
        self.best_loss = math.inf if state["best_loss"] is None else float(state["best_loss"])
        self.since_best = int(state["since_best"])
        weights = state.get("weights")
        if weights is not None:
            self._copy = [w.to(p.device, p.dtype) for w, p in zip(weights, self.params, strict=True)]

    def restore(self) -> None:
        """Put the best evaluation's weights back into the parameters."""
        import torch

        if self._copy is None:
            return
        with torch.no_grad():
            for param, kept in zip(self.params, self._copy, strict=True):
                param.copy_(kept)


def _agree(parallel: Any, decision: bool, params: list[Any]) -> bool:
    """Rank 0's decision on every rank (it alone evaluates); the decision itself on one process."""
    if parallel is None:
        return decision
    import torch
    import torch.distributed as dist

    device = params[0].device if params else torch.device("cpu")
    flag = torch.tensor([1.0 if decision else 0.0], device=device)
    dist.broadcast(flag, src=0, group=parallel.group)
    return bool(flag.item())


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
    accumulation: int = 1,
    eval_every: int = 0,
    patience: int = 0,
) -> LoopResult:
    """Train for `steps` optimizer steps (resuming from the checkpointer's latest state if it has one).

    Each step accumulates the gradients of `accumulation` micro-batches (`batch_at(index)`). With
    `eval_every` (needs `eval_batches`), the eval loss is measured every that many steps and at the last
    step, the best evaluation's weights are back in the model at the end, and `patience` > 0 stops the
    run after that many evaluations without improvement. Without it, the eval loss is measured once at
    the end.

    With `parallel` (a parallel.DataParallel), this process is one rank of a data-parallel run: it trains
    on its shard of each step's batch, gradients are averaged over all labelled tokens of the full batch
    (the step equals the one-process step), rank 0 alone saves checkpoints and reports progress, every
    rank restores from the same checkpoint, and tokens/s counts the whole batch. Rank 0 alone evaluates
    and decides an early stop for every rank."""
    import torch

    main = parallel is None or parallel.is_main
    if not main:
        progress = _silent
    if eval_every and not eval_batches:
        raise InvalidArgument(
            "eval_every needs held-out data, and this run has none: raise eval_fraction (text data "
            "needs more than seq_len held-out tokens) or set eval_every to 0"
        )

    # On a GPU, the fused AdamW kernel: faster, and without the foreach implementation's temporary copies
    # of every parameter (measured: 0.2 GB of peak memory on a 7B LoRA run).
    fused = bool(params) and all(p.is_cuda for p in params)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, fused=fused or None)
    scheduler = scheduler_for(optimizer, schedule, warmup, steps)
    losses: list[float] = []
    start = 1
    best = BestWeights(params, patience)
    restored = checkpointer.restore(model, optimizer, scheduler) if checkpointer else None
    if restored is not None:
        done, losses, evaluations = restored
        if evaluations:
            best.load_state(evaluations)
        start = done + 1
        progress(95.0 * done / steps, "resuming", f"from the checkpoint at step {done}")
    resumed_from = start - 1
    # The rates of steps before a resume follow from the schedule; those of this run are recorded.
    rates = [learning_rate * lr_factor(i, schedule, warmup, steps) for i in range(start - 1)]
    # A run that had already decided to stop (checkpointed at that step) stays stopped.
    stopped_early = bool(patience) and best.since_best >= patience and start <= steps
    if stopped_early:
        start = steps + 1
    model.train()
    real_tokens = 0
    started = time.perf_counter()
    step = start - 1
    try:
        for step in range(start, steps + 1):
            # Before the forward pass, so the last step's gradients are not held through it.
            optimizer.zero_grad(set_to_none=True)
            first = (step - 1) * accumulation + 1
            micro = (
                [batch_at(first)]
                if accumulation == 1
                else (batch_at(first + j) for j in range(accumulation))  # one at a time
            )
            loss_value, step_tokens = accumulate_gradients(model, params, micro, step, to_device, parallel)
            # Clip: an occasional odd batch (the data has some mojibake) must not undo the steps before it.
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            losses.append(float(loss_value))
            real_tokens += step_tokens
            elapsed = max(time.perf_counter() - started, 1e-9)
            done_here = step - start + 1
            if eval_every and (step % eval_every == 0 or step == steps):
                stop = False
                if main:
                    stop = best.record(step, evaluate(model, [to_device(b) for b in eval_batches]))
                    model.train()
                stopped_early = _agree(parallel, stop, params) and step < steps
            # After the evaluation, so that a run resumed from this step knows it (and its weights).
            if (
                main
                and checkpointer
                and ((checkpointer.every and step % checkpointer.every == 0) or checkpointer.draining())
            ):
                checkpointer.save(step, model, optimizer, scheduler, losses, evaluations=best.state())
            evaluated: dict[str, float] = {}
            if best.history:
                evaluated = {"eval_loss": best.history[-1][1], "best_eval_loss": best.best_loss}
            progress(
                95.0 * step / steps,
                "training",
                f"step {step}/{steps}"
                + (" (early stop: eval loss stopped improving)" if stopped_early else ""),
                step=step,
                loss=losses[-1],
                learning_rate=rates[-1],
                tokens_per_s=real_tokens / elapsed,
                eta_s=0.0 if stopped_early else elapsed / done_here * (steps - step),
                **evaluated,
            )
            if stopped_early:
                break
    except Cancelled:
        # Cancelled (by the user, or by a shutdown past its grace): keep what was learned so far.
        if main and checkpointer and step >= start and losses:
            checkpointer.save(step, model, optimizer, scheduler, losses, evaluations=best.state())
        raise
    except torch.OutOfMemoryError as exc:
        raise ResourceExhausted(
            f"out of GPU memory at step {step}: {str(exc).splitlines()[0]}. Use a smaller batch_size or "
            "seq_len, use gradient_accumulation_steps, turn on gradient_checkpointing, or train 4-bit (qlora)"
        ) from None
    seconds = time.perf_counter() - started
    model.eval()
    if eval_every:
        best.restore()
        eval_loss = best.best_loss if best.best_step is not None else None
    else:
        eval_loss = evaluate(model, [to_device(b) for b in eval_batches]) if eval_batches and main else None
    return LoopResult(
        losses,
        seconds,
        real_tokens,
        resumed_from,
        eval_loss,
        rates,
        eval_losses=best.history,
        best_step=best.best_step,
        stopped_early=stopped_early,
    )
