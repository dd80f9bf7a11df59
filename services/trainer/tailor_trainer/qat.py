"""Quantization-aware fine-tuning (QAT) with torchao's fake quantization.

Every Linear layer but the output embedding trains through torchao's FakeQuantizedLinear: the forward
pass rounds weights (int4 or int8, symmetric, per output channel or per group) and optionally
activations (int8 per token) the way the deployed model will, while gradients flow to the float weights
(straight-through). The weights learn to sit where rounding hurts least. After training the fake
quantizers are removed (`to_linear`), and the model is saved as a plain float hf-safetensors folder with
`qat` recorded in tailor_format.json: the quantizer's matching method (rtn or gptq at the same bits and
group size) then rounds it for real and loses less than it would on a model trained without QAT.

All parameters train (full fine-tuning): that is what QAT is for, and on models the size Tailor
fine-tunes on CPU it is cheap. QLoRA is the other way to recover quality at 4 bits (issue 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tailor_runtime.errors import FailedPrecondition, InvalidArgument
from tailor_runtime.progress import ProgressFn


class QatTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weight_bits: Literal[4, 8] = Field(
        default=4, description="Bits of the fake-quantized weights (int4 or int8)."
    )
    group_size: int | None = Field(
        default=None,
        ge=1,
        description="Weights per scale along the input dimension; None: one scale per output channel. Must "
        "divide every layer's input width and match the quantizer's group_size used afterwards.",
    )
    activation_bits: Literal[8] | None = Field(
        default=None,
        description="8: also fake-quantize activations (int8 per token, asymmetric); None: weights only.",
    )
    steps: int = Field(default=30, ge=1, le=1_000_000, description="Optimizer steps.")
    learning_rate: float = Field(default=1e-4, gt=0, le=1.0, description="AdamW learning rate (constant).")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Sequences per step.")
    seq_len: int = Field(default=128, ge=2, le=1_000_000, description="Tokens per training sequence.")
    seed: int = Field(default=0, ge=0, description="Seeds batch sampling.")
    checkpoint_every: int = Field(
        default=25,
        ge=0,
        description="Save a resumable checkpoint every N steps (0: only at cancel/shutdown).",
    )


def _availability() -> tuple[bool, str]:
    from tailor_runtime.libraries import importable

    return importable("torchao.quantization.qat")


def prepare_fake_quantization(model: Any, cfg: QatTrainConfig) -> int:
    """Swap each Linear (not the output embedding) for torchao's FakeQuantizedLinear; returns how many."""
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    out = model.get_output_embeddings()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not out]
    if cfg.group_size is not None:
        bad = sorted({m.in_features for _, m in linears if m.in_features % cfg.group_size})
        if bad:
            raise InvalidArgument(
                f"group_size {cfg.group_size} does not divide the input widths {bad} of this model; use a divisor "
                "of every width, or leave group_size unset for one scale per output channel"
            )
    granularity = PerAxis(0) if cfg.group_size is None else PerGroup(cfg.group_size)
    dtype = {4: torch.int4, 8: torch.int8}[cfg.weight_bits]
    weight = IntxFakeQuantizeConfig(dtype, granularity=granularity, is_symmetric=True)
    activation = (
        IntxFakeQuantizeConfig(torch.int8, granularity="per_token", is_symmetric=False)
        if cfg.activation_bits
        else None
    )
    quantize_(
        model,
        QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
        filter_fn=lambda module, _fqn: isinstance(module, torch.nn.Linear) and module is not out,
    )
    return len(linears)


def remove_fake_quantization(model: Any) -> None:
    """Back to plain nn.Linear layers holding the trained float weights."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantizedLinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.to_linear())


def finetune_qat(
    model_dir: Path,
    train_text: Path,
    out_dir: Path,
    cfg: QatTrainConfig,
    progress: ProgressFn,
    checkpointer=None,
) -> dict[str, Any]:
    """Full fine-tuning through fake quantization; writes a float hf-safetensors folder. Returns metrics."""
    import torch

    from tailor_runtime.ml.formats import HF_SAFETENSORS
    from tailor_runtime.ml.model_io import save_hf_model, write_format
    from tailor_trainer.data import BatchSampler, load_token_stream
    from tailor_trainer.loop import train
    from tailor_trainer.lora import load_full_precision_base

    ok, why = _availability()
    if not ok:
        raise FailedPrecondition(f"qat cannot run on this worker: {why}")
    model, tokenizer = load_full_precision_base(model_dir, cfg.seq_len, "QAT", progress)
    model = model.to(torch.float32)
    stream = load_token_stream(train_text, tokenizer, cfg.seq_len)
    layers = prepare_fake_quantization(model, cfg)
    sampler = BatchSampler(stream, cfg.batch_size, cfg.seq_len, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    result = train(
        model, params, sampler.batch, cfg.steps, cfg.learning_rate, progress, checkpointer=checkpointer
    )
    losses, elapsed = result.losses, result.seconds
    remove_fake_quantization(model)
    progress(96.0, "saving", "writing the QAT-trained model")
    save_hf_model(model, tokenizer, out_dir, dtype="float32")
    qat = {
        "weight_bits": cfg.weight_bits,
        "group_size": cfg.group_size,
        "activation_bits": cfg.activation_bits,
    }
    write_format(out_dir, HF_SAFETENSORS, dtype="float32", qat=qat)
    progress(100.0, "saving", "done")
    return {
        "final_loss": losses[-1],
        "initial_loss": losses[0],
        "loss_curve": losses,
        "tokens_per_s": cfg.steps * cfg.batch_size * cfg.seq_len / max(elapsed, 1e-9),
        "steps": cfg.steps,
        "trainable_params": sum(p.numel() for p in params),
        "fake_quantized_layers": layers,
        "train_tokens": len(stream),
        "qat": qat,
    }
