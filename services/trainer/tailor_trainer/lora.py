"""LoRA, DoRA and QLoRA fine-tuning of a causal LM, with peft (and bitsandbytes for QLoRA).

`finetune_lora` trains low-rank adapters on the model's linear projections (DoRA: weight-decomposed
adapters, peft's `use_dora`; QLoRA: the frozen base loaded in 4-bit NF4 with double quantization), on
plain text or instruction data (datasets.py), then writes two artifacts: the adapter alone (peft format,
safetensors) and, on request, the base model with the adapter merged in (a plain hf-safetensors float32
folder every other stage can use; for QLoRA the adapter is merged into the full-precision base, not the
4-bit one). Nothing is written unless training completes: a cancellation leaves both output folders
untouched (the checkpointer, if any, keeps the progress).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.progress import ProgressFn


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
    learning_rate: float = Field(
        default=1e-3, gt=0, le=1.0, description="Peak AdamW learning rate (after warm-up; see lr_schedule)."
    )
    batch_size: int = Field(
        default=8,
        ge=1,
        le=4096,
        description="Rows per micro-batch; an optimizer step takes batch_size x gradient_accumulation_steps.",
    )
    gradient_accumulation_steps: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Micro-batches whose gradients one optimizer step sums (weighted by labelled tokens): "
        "the step of a batch that many times larger, in the memory of one micro-batch.",
    )
    seq_len: int = Field(default=128, ge=2, le=1_000_000, description="Tokens per training sequence.")
    seed: int = Field(default=0, ge=0, description="Seeds LoRA initialisation and batch sampling.")
    dora: bool = Field(default=False, description="DoRA: learn magnitude and direction (peft use_dora).")
    quantize_base: Literal["nf4"] | None = Field(
        default=None,
        description="QLoRA: load the frozen base in 4-bit NF4 (double quantization, bitsandbytes).",
    )
    data_format: Literal["auto", "text", "alpaca", "chat"] = Field(
        default="auto",
        description="Training data format; auto: JSON with 'messages' or 'conversations' (ShareGPT) is "
        "chat, other JSON alpaca, anything else text.",
    )
    chat_template: str | None = Field(
        default=None,
        max_length=100_000,
        description="Jinja chat template for chat data (as in tokenizer_config.json); None: the "
        "tokenizer's own. Saved into the merged model's tokenizer.",
    )
    alpaca_template: str | None = Field(
        default=None,
        description="Prompt for Alpaca records with input ({instruction}, {input}); None: Alpaca's.",
    )
    alpaca_template_no_input: str | None = Field(
        default=None, description="Prompt for Alpaca records without input ({instruction}); None: Alpaca's."
    )
    chat_turn_template: str | None = Field(
        default=None,
        description="A plain layout instead of a chat template: one turn ({role}, {content}), e.g. "
        "'### {role}:\\n{content}\\n\\n'; None: use the chat template.",
    )
    overlong: Literal["truncate", "drop"] = Field(
        default="truncate", description="Examples longer than seq_len: cut the response, or leave them out."
    )
    packing: bool = Field(
        default=True, description="Pack several examples per row (attention kept within each example)."
    )
    eval_fraction: float = Field(
        default=0.05,
        ge=0.0,
        lt=0.5,
        description="Share of examples held out for the eval loss (seeded split).",
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        default="constant",
        description="Learning rate after warm-up: constant, or linear or cosine decay to 10% by the end.",
    )
    warmup_steps: int = Field(
        default=0, ge=0, le=1_000_000, description="Linear learning-rate warm-up steps (less than steps)."
    )
    eval_every: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Measure the held-out loss every N steps and at the last step, and publish the weights "
        "of the best evaluation; 0: one evaluation at the end, last weights published.",
    )
    early_stopping_patience: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="Stop after this many evaluations without a lower eval loss (needs eval_every); "
        "0: never stop early.",
    )
    checkpoint_every: int = Field(
        default=25,
        ge=0,
        description="Save a resumable checkpoint every N steps (0: only at cancel/shutdown).",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward: less memory, about 30% slower."
    )
    merge: bool = Field(default=True, description="Also publish the base model with the adapter merged in.")
    tensorboard: bool = Field(
        default=False,
        description="Write TensorBoard event files of the run (loss, learning rate, eval loss per step) into "
        "the adapter artifact's runs/ folder, with TensorBoard's own writer (needs tensorboard installed).",
    )
    fused_kernels: bool = Field(
        default=True,
        description=(
            "On a GPU, Liger's Triton kernels for RMSNorm, SwiGLU and RoPE, and its fused linear "
            "cross-entropy for the loss, when liger-kernel is installed."
        ),
    )
    attention: Literal["sdpa", "flex"] = Field(
        default="sdpa",
        description="Attention for packed rows: sdpa with the dense block-diagonal mask, or flex "
        "(on a GPU: FlexAttention with a document BlockMask, skipping cross-document blocks).",
    )
    compile_layers: bool = Field(
        default=False,
        description="torch.compile each decoder layer (regional compilation; batches padded to seq_len "
        "so shapes stay fixed). The first step pays the compilation.",
    )
    data_parallel: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Data-parallel ranks (processes): one per GPU on a GPU pod, gloo processes on CPU; "
        "1 = one process. Same run, same loss curve, faster (parallel.py).",
    )
    base_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="dtype of the frozen base (adapters train in float32); auto: bfloat16 on a GPU, float32 on CPU.",
    )

    @field_validator("alpaca_template", "alpaca_template_no_input", "chat_turn_template")
    @classmethod
    def _placeholders(cls, v: str | None, info) -> str | None:
        needed = {
            "alpaca_template": ("{instruction}", "{input}"),
            "alpaca_template_no_input": ("{instruction}",),
            "chat_turn_template": ("{role}", "{content}"),
        }[info.field_name]
        missing = [p for p in needed if v is not None and p not in v]
        if missing:
            raise ValueError(f"must contain {', '.join(needed)}; missing {', '.join(missing)}")
        return v

    @field_validator("chat_template")
    @classmethod
    def _jinja(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("must be a Jinja template, or left unset for the tokenizer's own")
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            ImmutableSandboxedEnvironment().parse(v)
        except TemplateSyntaxError as exc:
            raise ValueError(f"is not a valid Jinja template: {exc.message} (line {exc.lineno})") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> LoraTrainConfig:
        if self.warmup_steps and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be less than steps ({self.steps})")
        if self.eval_every and self.eval_fraction == 0:
            raise ValueError("eval_every needs held-out data: set eval_fraction above 0, or eval_every to 0")
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError(
                "early_stopping_patience needs evaluations during training: set eval_every (e.g. 10)"
            )
        if self.chat_template is not None and self.chat_turn_template is not None:
            raise ValueError("give chat_template or chat_turn_template, not both")
        return self

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not name.strip() for name in v)):
            raise ValueError("give at least one module name, or leave it unset for the default")
        return v


def linear_module_names(model: Any) -> list[str]:
    """Distinct leaf names of the model's linear layers (nn.Linear, and GPT-2's Conv1D, which peft
    adapts too), output embedding excluded."""
    import torch
    from transformers.pytorch_utils import Conv1D

    out = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear | Conv1D) and mod is not out
    }
    return sorted(names)


def resolve_target_modules(model: Any, requested: list[str] | None) -> list[str]:
    """The adapted layers: `requested`, each checked, or the family's LoRA targets from the architecture
    registry (every linear projection of attention and MLP, never the output head)."""
    from tailor_runtime.ml import architectures

    available = linear_module_names(model)
    if requested is None:
        arch = architectures.for_config(model.config.to_dict())
        targets = [m for m in arch.lora_targets if m in available]
        if not targets:
            raise InvalidArgument(
                f"none of the {arch.family} family's LoRA targets {list(arch.lora_targets)} is a linear "
                "layer of this model; name target_modules explicitly",
                choices=available,
            )
        return targets
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
    checkpointer: Any = None,
    parallel: Any = None,
) -> dict[str, Any]:
    """Train adapters on `train_text` (any supported format); write the adapter (and the merged model).

    With `parallel` (parallel.DataParallel) this is one rank of a data-parallel run (see parallel.py):
    rank r trains on cuda:r (or the CPU), and only rank 0 writes the outputs and returns the metrics
    (the others return {})."""
    import torch

    from tailor_runtime.ml.formats import PEFT_LORA
    from tailor_runtime.ml.model_io import save_hf_model, write_format
    from tailor_trainer.loop import train

    if cfg.tensorboard:
        from tailor_trainer.tensorboard_log import require_tensorboard

        require_tensorboard()
    model, tokenizer = load_full_precision_base(model_dir, cfg.seq_len, "LoRA training", progress)
    targets = resolve_target_modules(model, cfg.target_modules)
    if cfg.chat_template is not None:
        # Chat data is rendered with it, and the merged model's tokenizer keeps it: the model then meets
        # the layout it was trained on (and an export, e.g. GGUF, can carry it).
        tokenizer.chat_template = cfg.chat_template
    # All data is read and validated before the (possibly 4-bit, possibly GPU) model is built.
    batch_at, eval_batches, data_stats = training_batches(train_text, tokenizer, cfg)
    if cfg.compile_layers:
        batch_at, eval_batches = fixed_width_batches(batch_at, eval_batches, cfg.seq_len, tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and parallel is not None:
        device = f"cuda:{parallel.rank}"
    if cfg.quantize_base:
        model = load_4bit_base(model_dir, device)
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
            cfg.base_dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32
        )
        model = model.to(device=device, dtype=dtype)
    model = build_peft_model(model, cfg, targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]

    def to_device(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}

    result = train(
        model,
        params,
        batch_at,
        cfg.steps,
        cfg.learning_rate,
        progress,
        schedule=cfg.lr_schedule,
        warmup=cfg.warmup_steps,
        checkpointer=checkpointer,
        eval_batches=eval_batches,
        to_device=to_device,
        parallel=parallel,
        accumulation=cfg.gradient_accumulation_steps,
        eval_every=cfg.eval_every,
        patience=cfg.early_stopping_patience,
    )
    if parallel is not None and not parallel.is_main:
        return {}

    progress(96.0, "saving", "writing the adapter" + (" and the merged model" if cfg.merge else ""))
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
        dora=cfg.dora,
        quantize_base=cfg.quantize_base,
    )
    tokens_per_s = result.real_tokens / max(result.seconds, 1e-9)
    if cfg.tensorboard:
        from tailor_trainer.tensorboard_log import RUNS, write_run

        write_run(adapter_out / RUNS, result, cfg.model_dump(), tokens_per_s)
    if cfg.merge:
        merged = (
            merge_into_full_precision(model_dir, adapter_out)
            if cfg.quantize_base
            else model.merge_and_unload()
        )
        save_hf_model(merged.cpu(), tokenizer, merged_out, dtype="float32")
    progress(100.0, "saving", "done")
    return {
        "final_loss": result.losses[-1],
        "initial_loss": result.losses[0],
        "eval_loss": result.eval_loss,
        "loss_curve": result.losses,
        "learning_rates": result.learning_rates,
        "tokens_per_s": tokens_per_s,
        "steps": result.steps_run,
        "max_steps": cfg.steps,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        **evaluation_metrics(result),
        "resumed_from_step": result.resumed_from,
        "trainable_params": trainable,
        "total_params": total,
        "target_modules": targets,
        "device": device,
        **data_stats,
    }


def evaluation_metrics(result: Any) -> dict[str, Any]:
    """What the evaluations during training found: each one, the step whose weights were published
    (the best evaluation's) and whether the run stopped early; empty without eval_every."""
    if not result.eval_losses:
        return {}
    return {
        "eval_losses": [{"step": step, "loss": loss} for step, loss in result.eval_losses],
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
    }


def lora_rank(
    parallel: Any, model_dir, train_text, merged_out, adapter_out, cfg, checkpointer=None, *, progress
):
    """One rank of a data-parallel LoRA run (the target parallel.launch runs in each rank process)."""
    return finetune_lora(
        model_dir, train_text, merged_out, adapter_out, cfg, progress, checkpointer, parallel
    )


def load_full_precision_base(model_dir: Path, seq_len: int, what: str, progress: ProgressFn):
    """(model, tokenizer) of a plain HF folder, refusing quantized folders and a seq_len beyond its context."""
    from tailor_runtime.ml.formats import HF_SAFETENSORS
    from tailor_runtime.ml.model_io import load_causal_lm, read_format

    fmt = read_format(model_dir)
    if fmt["format"] != HF_SAFETENSORS:
        raise InvalidArgument(
            f"{what} needs a full-precision model (format {HF_SAFETENSORS!r}); the model given is "
            f"{fmt['format']!r} (already quantized): start from its full-precision parent"
        )
    progress(0.0, "loading", f"loading {Path(model_dir).name}")
    model, tokenizer = load_causal_lm(model_dir)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise InvalidArgument(f"seq_len {seq_len} exceeds the model's context of {max_pos} tokens")
    return model, tokenizer


def build_peft_model(model: Any, cfg: LoraTrainConfig, targets: list[str]) -> Any:
    """The base wrapped with (Do)LoRA adapters, with gradient checkpointing and fused kernels as configured."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tailor_trainer import speed

    if cfg.fused_kernels and next(model.parameters()).is_cuda:
        # Compiled layers get their norms and MLP fused by the compiler; Liger's kernels stay outside.
        apply_fused_kernels(model, in_layers=not cfg.compile_layers)
    if cfg.attention == "flex" and next(model.parameters()).is_cuda and speed.flex_supports(model):
        # FlexAttention has no backward on CPU (torch 2.13) and no kernel for heads narrower than 16
        # (stories260K's are 8): there the dense-mask SDPA path stays.
        speed.use_flex_document_attention(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(cfg.seed)  # LoRA A matrices are randomly initialised (B starts at zero)
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=cfg.dora,
    )
    # Adapters in float32 over a bf16 base (peft's autocast_adapter_dtype): updates this small need the
    # precision, and the base's memory is what matters.
    peft_model = get_peft_model(model, lora, autocast_adapter_dtype=True)
    if cfg.compile_layers:
        speed.compile_decoder_layers(peft_model)
    return peft_model


def apply_fused_kernels(model: Any, in_layers: bool = True) -> bool:
    """Liger's Triton RMSNorm and SwiGLU on this model's own modules, and its fused linear
    cross-entropy for the training loss; False when unavailable.

    Only this instance changes. Liger also replaces names in the model's modeling module (the norm and
    MLP classes, the RoPE function), which would turn every model built later in this process into a
    Triton model, and break the next one on a CPU (found by the GPU tests: a CPU perplexity run after a
    fine-tune failed in Liger's RMSNorm). Those module globals are put back afterwards, and RoPE, which
    Liger can only patch as a module global, stays PyTorch's."""
    import sys

    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return False
    from tailor_trainer.loop import FUSED_LOSS_ATTR

    modeling = sys.modules[type(model).__module__]
    before = dict(vars(modeling))
    try:
        # The loss is computed by loop.batch_loss (only on labelled positions), not by the model's
        # forward: the model's own loss patches stay off and batch_loss uses Liger's fused loss.
        _apply_liger_kernel_to_instance(
            model=model,
            rope=False,
            rms_norm=in_layers,
            swiglu=in_layers,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
        )
    finally:
        restore_module_globals(modeling, before)
    setattr(model, FUSED_LOSS_ATTR, True)
    return True


def restore_module_globals(module: Any, before: dict[str, Any]) -> None:
    """Put `module`'s names back to `before` (a copy of its namespace): changed ones reset, new ones gone."""
    for name in list(vars(module)):
        if name not in before:
            delattr(module, name)
    for name, value in before.items():
        if vars(module).get(name) is not value:
            setattr(module, name, value)


def fixed_width_batches(batch_at: Any, eval_batches: list, width: int, tokenizer: Any):
    """Every batch padded to `width` (speed.pad_to_width): compiled layers then see one shape."""
    from tailor_trainer.speed import pad_to_width

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return (
        lambda step: pad_to_width(batch_at(step), width, pad),
        [pad_to_width(b, width, pad) for b in eval_batches],
    )


def training_batches(path: Path, tokenizer: Any, cfg: LoraTrainConfig):
    """(batch_at(step), eval batches, data statistics) for the configured data format."""
    from tailor_trainer import datasets
    from tailor_trainer.data import BatchSampler, load_token_stream

    fmt = datasets.detect_format(path) if cfg.data_format == "auto" else cfg.data_format
    if fmt == "text":
        stream = load_token_stream(path, tokenizer, cfg.seq_len)
        held = int(len(stream) * cfg.eval_fraction)
        eval_batches = []
        if held > cfg.seq_len:
            # The last tokens are held out: training windows never reach them.
            tail = stream.ids[len(stream) - held :]
            windows = tail[: (len(tail) - 1) // cfg.seq_len * cfg.seq_len + 1]
            for i in range(0, min(len(windows) - 1, 16 * cfg.seq_len), cfg.seq_len):
                w = windows[i : i + cfg.seq_len + 1]
                eval_batches.append({"input_ids": w[None, :-1], "labels": w[None, 1:]})
            stream = type(stream)(stream.ids[: len(stream) - held], stream.stories)
        sampler = BatchSampler(stream, cfg.batch_size, cfg.seq_len, cfg.seed)
        stats = {"data_format": "text", "train_tokens": len(stream), "train_stories": stream.stories}
        return sampler.batch, eval_batches, stats
    templates = datasets.Templates(
        alpaca=cfg.alpaca_template or datasets.ALPACA_PROMPT,
        alpaca_no_input=cfg.alpaca_template_no_input or datasets.ALPACA_PROMPT_NO_INPUT,
        chat_turn=cfg.chat_turn_template,
        chat_template=cfg.chat_template,
    )
    examples, stats = datasets.build_examples(path, tokenizer, fmt, cfg.seq_len, cfg.overlong, templates)
    train_set, eval_set = datasets.split(examples, cfg.eval_fraction, cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = datasets.ExampleBatches(train_set, cfg.batch_size, cfg.seq_len, cfg.packing, cfg.seed, pad)
    eval_batches = [
        datasets.collate([[e] for e in eval_set[i : i + cfg.batch_size]], pad)
        for i in range(0, min(len(eval_set), 64), cfg.batch_size)
    ]
    stats.update(
        {
            "train_examples": len(train_set),
            "eval_examples": len(eval_set),
            "packed_rows": len(batches.rows) if cfg.packing else None,
            "packing": cfg.packing,
        }
    )
    return batches.batch, eval_batches, stats


def load_4bit_base(model_dir: Path, device: str):
    """The frozen base in NF4 with double quantization (QLoRA); adapters train in float32 beside it."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tailor_runtime.errors import FailedPrecondition
    from tailor_runtime.ml.formats.bnb import availability, disable_cpu_repacking

    ok, why = availability()
    if not ok:
        raise FailedPrecondition(f"QLoRA needs bitsandbytes: {why}")
    compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        ),
        device_map={"": device if device == "cpu" else (torch.device(device).index or 0)},
        dtype=compute,
        use_safetensors=True,
        local_files_only=True,
    )
    disable_cpu_repacking(model)  # see formats/bnb.py: the repacked CPU layout breaks odd widths
    return model


def merge_into_full_precision(model_dir: Path, adapter_dir: Path):
    """The trained adapter applied to the float base and merged (a 4-bit base would lose the precision)."""
    import torch
    from peft import PeftModel

    from tailor_runtime.ml.model_io import load_causal_lm

    base, _ = load_causal_lm(model_dir)
    return PeftModel.from_pretrained(base.to(torch.float32), adapter_dir).merge_and_unload()
