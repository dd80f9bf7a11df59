"""LoRA fine-tuning of a causal LM on plain text, with peft, on CPU or whatever torch defaults to.

`finetune_lora` trains low-rank adapters on the model's linear projections, then writes two artifacts:
the adapter alone (peft format, safetensors) and the base model with the adapter merged in (a plain
hf-safetensors float32 folder that every other stage can use). Nothing is written unless training
completes: a cancellation (progress() raising Cancelled) leaves both output folders untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.progress import ProgressFn

# Linear projections per architecture (model_type in config.json). Models not listed get every nn.Linear
# except the output embedding, which is what these lists spell out for their architectures.
TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class LoraTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(default=8, ge=1, le=1024, description="LoRA rank: width of the low-rank update.")
    alpha: float = Field(
        default=16.0, gt=0, description="LoRA scaling numerator; the update is scaled by alpha/r."
    )
    dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training."
    )
    target_modules: list[str] | None = Field(
        default=None,
        description="Names of the linear layers to adapt (e.g. q_proj); None: all linear projections of the "
        "architecture (all of attention and MLP for Llama), never the output embedding.",
    )
    steps: int = Field(default=30, ge=1, le=1_000_000, description="Optimizer steps.")
    learning_rate: float = Field(default=1e-3, gt=0, le=1.0, description="AdamW learning rate (constant).")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Sequences per step.")
    seq_len: int = Field(default=128, ge=2, le=1_000_000, description="Tokens per training sequence.")
    seed: int = Field(default=0, ge=0, description="Seeds LoRA initialisation and batch sampling.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not name.strip() for name in v)):
            raise ValueError("give at least one module name, or leave it unset for the default")
        return v


def linear_module_names(model: Any) -> list[str]:
    """Distinct leaf names of the model's nn.Linear layers, output embedding excluded."""
    import torch

    out = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and mod is not out
    }
    return sorted(names)


def resolve_target_modules(model: Any, requested: list[str] | None) -> list[str]:
    available = linear_module_names(model)
    if requested is None:
        default = TARGET_MODULES.get(model.config.model_type)
        return [m for m in default if m in available] if default else available
    unknown = sorted(set(requested) - set(available))
    if unknown:
        raise InvalidArgument(
            f"target_modules {unknown} are not linear layers of this model", choices=available
        )
    return sorted(set(requested))


def _normalize_adapter_folder(adapter_out: Path) -> None:
    """Make peft's output reproducible and location-independent.

    peft writes target_modules in set order (differs between processes), the base model's local path (the
    adapter's base is recorded by Tailor's lineage instead) and a template model card README.md.
    """
    import json

    path = adapter_out / "adapter_config.json"
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config["base_model_name_or_path"] = None
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (adapter_out / "README.md").unlink(missing_ok=True)


def finetune_lora(
    model_dir: Path,
    train_text: Path,
    merged_out: Path,
    adapter_out: Path,
    cfg: LoraTrainConfig,
    progress: ProgressFn,
) -> dict[str, Any]:
    """Train LoRA adapters on `train_text`; write the adapter and the merged model. Returns metrics."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tailor_runtime.ml.formats import HF_SAFETENSORS, PEFT_LORA
    from tailor_runtime.ml.model_io import load_causal_lm, read_format, save_hf_model, write_format
    from tailor_trainer.data import BatchSampler, load_token_stream
    from tailor_trainer.loop import train_steps

    fmt = read_format(model_dir)
    if fmt["format"] != HF_SAFETENSORS:
        raise InvalidArgument(
            f"LoRA training needs a full-precision model (format {HF_SAFETENSORS!r}); {model_dir} is {fmt['format']!r}"
        )
    progress(0.0, "loading", f"loading {Path(model_dir).name}")
    model, tokenizer = load_causal_lm(model_dir)
    model = model.to(torch.float32)  # train in float32 whatever the stored dtype
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise InvalidArgument(f"seq_len {cfg.seq_len} exceeds the model's context of {max_pos} tokens")
    stream = load_token_stream(train_text, tokenizer, cfg.seq_len)
    targets = resolve_target_modules(model, cfg.target_modules)

    torch.manual_seed(cfg.seed)  # LoRA A matrices are randomly initialised (B starts at zero)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    sampler = BatchSampler(stream, cfg.batch_size, cfg.seq_len, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, elapsed = train_steps(model, params, sampler, cfg.steps, cfg.learning_rate, progress)
    tokens_per_step = cfg.batch_size * cfg.seq_len

    progress(96.0, "saving", "writing adapter and merged model")
    adapter_out, merged_out = Path(adapter_out), Path(merged_out)
    model.save_pretrained(adapter_out, safe_serialization=True)
    _normalize_adapter_folder(adapter_out)
    write_format(
        adapter_out,
        PEFT_LORA,
        dtype="float32",
        r=cfg.r,
        alpha=cfg.alpha,
        target_modules=targets,
        base_model_type=model.config.model_type,
    )
    merged = model.merge_and_unload()
    save_hf_model(merged, tokenizer, merged_out, dtype="float32")
    progress(100.0, "saving", "done")
    return {
        "final_loss": losses[-1],
        "initial_loss": losses[0],
        "loss_curve": losses,
        "tokens_per_s": cfg.steps * tokens_per_step / max(elapsed, 1e-9),
        "steps": cfg.steps,
        "trainable_params": trainable,
        "total_params": total,
        "train_tokens": len(stream),
        "train_stories": stream.stories,
        "target_modules": targets,
    }
