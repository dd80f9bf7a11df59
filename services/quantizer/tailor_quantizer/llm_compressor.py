"""The one module that talks to llm-compressor and compressed-tensors.

Every import of `llmcompressor`, `compressed_tensors` and `datasets` lives here (inside functions, so that
importing this module stays cheap), so that a new release of either library changes one file. The
methods (methods/compressed.py, methods/auto_mixed.py) describe what they want in plain Python:

    groups = [Group(targets=["Linear"], weights=int_weights(bits=4, group_size=128, symmetric=True))]
    model, tokenizer, layers = load(model_dir, "gptq")     # + architecture and group-size checks
    oneshot(model, gptq(groups, dampening_frac=0.01, actorder="static"), job)
    metrics = save(model, tokenizer, out_dir, method="gptq", scheme="W4A16", ...)

What comes out is a `compressed-tensors` folder: the Hugging Face layout with `quantization_config` in
config.json and packed weights in safetensors, which vLLM serves and transformers loads (decompressing
on CPU; see tailor_runtime.ml.formats.compressed_tensors).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tailor_runtime.errors import InvalidArgument

if TYPE_CHECKING:  # the methods package imports this module while it registers its methods
    from tailor_quantizer.methods.registry import QuantizeJob

LIBRARIES = ("llmcompressor", "compressed-tensors", "datasets", "transformers", "torch")
# The output head stays in full precision, as in every llm-compressor recipe: it is tied to the
# embeddings in many models, and the logits are the most sensitive layer.
IGNORE = ["lm_head"]
# Calibration batches hold about this many tokens: one batch per sequence wastes most of the time in
# per-batch overhead on small models; much larger batches cost activation memory on big ones.
BATCH_TOKENS = 4096
# Layers that vLLM fuses into one matmul (qkv_proj, gate_up_proj) must share one quantization scheme
# there, so per-layer choices (auto mixed precision) are made per fused group.
FUSED_SUFFIXES = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
}


@functools.cache
def availability() -> tuple[bool, str]:
    from tailor_quantizer.methods.registry import importable

    return importable("llmcompressor", "compressed_tensors", "datasets")


@dataclass(frozen=True)
class Group:
    """One compressed-tensors config group: which Linear layers, how their weights (and inputs) are stored.

    targets: "Linear" (every Linear but the ignored head) or exact module names.
    weights / input_activations: keyword arguments of compressed_tensors' QuantizationArgs.
    """

    targets: tuple[str, ...] | list[str]
    weights: dict[str, Any]
    input_activations: dict[str, Any] | None = None


def int_weights(bits: int, group_size: int, symmetric: bool) -> dict[str, Any]:
    """QuantizationArgs for integer weights: a scale per `group_size` inputs, or per output channel (-1)."""
    if group_size == -1:
        return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "channel"}
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group",
        "group_size": group_size,
    }


def scheme_name(bits: int, activations: int | str = 16) -> str:
    """W4A16, W8A8, ...: the names vLLM and llm-compressor use, recorded in tailor_format.json."""
    return f"W{bits}A{activations}"


# --- loading and checking -----------------------------------------------------------------------------


def load(
    model_dir: Path, method: str, job: QuantizeJob, needs_mappings: str = ""
) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, {name: Linear to quantize}) from a full-precision folder, after checking that
    llm-compressor can quantize this architecture (`needs_mappings`: "awq" or "smoothquant" also needs
    the architecture in that algorithm's table of which layers to balance)."""
    from tailor_quantizer.methods.registry import require_full_precision
    from tailor_runtime.ml.model_io import load_causal_lm

    require_full_precision(model_dir)
    job.progress(0.0, "loading", f"loading {Path(model_dir).name}")
    model, tokenizer = load_causal_lm(model_dir)
    layers = check_architecture(model, method, needs_mappings)
    return model, tokenizer, layers


def quantizable_linears(model: Any) -> dict[str, Any]:
    """Every torch.nn.Linear that the recipes target ("Linear" minus the head), by module name."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and name not in IGNORE
    }


def mapping_architectures(algorithm: str) -> dict[str, Any]:
    """Architecture name -> layer mappings that llm-compressor knows for AWQ or SmoothQuant."""
    if algorithm == "awq":
        from llmcompressor.modifiers.transform.awq import AWQ_MAPPING_REGISTRY

        return AWQ_MAPPING_REGISTRY
    from llmcompressor.modifiers.transform.smoothquant.utils import MAPPINGS_REGISTRY

    return MAPPINGS_REGISTRY


def check_architecture(model: Any, method: str, needs_mappings: str = "") -> dict[str, Any]:
    """The Linear layers to quantize; InvalidArgument naming what is supported when this model is not a
    decoder-only transformers model with torch.nn.Linear projections (or, for AWQ and SmoothQuant, one
    whose layer mapping llm-compressor knows)."""
    config = getattr(model, "config", None)
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    supported = (
        "decoder-only transformers models whose attention and MLP projections are torch.nn.Linear "
        "(Llama, Mistral, Qwen2/3, Gemma, Phi-3, Granite, ...)"
    )
    if getattr(config, "is_encoder_decoder", False):
        raise InvalidArgument(f"{method} quantizes {supported}; {architecture} is an encoder-decoder model")
    layers = quantizable_linears(model)
    if not layers:
        kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "weight")} - {"Embedding"})
        raise InvalidArgument(
            f"{method} quantizes {supported}; {architecture} has no torch.nn.Linear layer besides its output "
            f"head (its weight layers are {', '.join(kinds[:6])})"
        )
    if needs_mappings:
        known = mapping_architectures(needs_mappings)
        if architecture not in known:
            raise InvalidArgument(
                f"{method} needs to know which layers of the model balance each other, and llm-compressor "
                f"has no {needs_mappings} mapping for {architecture}",
                choices=[a for a in known if a.endswith("ForCausalLM")],
            )
    return layers


def check_group_size(layers: dict[str, Any], group_size: int, method: str) -> None:
    """InvalidArgument, before any work, when `group_size` does not divide every layer's input width:
    a group of weights shares one scale, and compressed-tensors stores whole groups only."""
    if group_size == -1:
        return
    widths = {name: layer.in_features for name, layer in layers.items()}
    bad = [f"{name} ({width})" for name, width in widths.items() if width % group_size]
    if not bad:
        return
    common = functools.reduce(math.gcd, widths.values())
    divisors = [str(d) for d in range(2, common + 1) if common % d == 0]
    listed = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    working = (
        f"a group size that divides every layer's input width ({', '.join(divisors)}) or " if divisors else ""
    )
    raise InvalidArgument(
        f"{method}: group_size {group_size} does not divide the input width of {len(bad)} of "
        f"{len(widths)} layers: {listed}. Use {working}group_size -1 (one scale per output channel)"
    )


def fused_unit(name: str) -> str:
    """The vLLM fusion group a layer belongs to: model.layers.0.self_attn.q_proj -> ...self_attn.qkv."""
    parent, _, leaf = name.rpartition(".")
    return f"{parent}.{FUSED_SUFFIXES[leaf]}" if leaf in FUSED_SUFFIXES else name


# --- recipes --------------------------------------------------------------------------------------------


def _config_groups(groups: list[Group]) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return {
        f"group_{i}": QuantizationScheme(
            targets=list(g.targets),
            weights=QuantizationArgs(**g.weights),
            input_activations=QuantizationArgs(**g.input_activations) if g.input_activations else None,
        )
        for i, g in enumerate(groups)
    }


def rtn(groups: list[Group]) -> list[Any]:
    """Round to nearest: scales from each group's min/max, no calibration (the baseline)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [QuantizationModifier(config_groups=_config_groups(groups), ignore=IGNORE)]


def gptq(groups: list[Group], dampening_frac: float, actorder: str, block_size: int = 128) -> list[Any]:
    """GPTQ: quantizes columns one block at a time, updating the remaining ones with the inverse Hessian
    of the layer's calibration inputs so that the layer's output error stays small."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    return [
        GPTQModifier(
            config_groups=_config_groups(groups),
            ignore=IGNORE,
            dampening_frac=dampening_frac,
            actorder=None if actorder == "none" else actorder,
            block_size=block_size,
        )
    ]


def awq(groups: list[Group], n_grid: int, duo_scaling: bool) -> list[Any]:
    """AWQ: scales up the input channels that carry large activations (and the weights that read them)
    before round-to-nearest, searching the scale per mapping on calibration data."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [
        AWQModifier(n_grid=n_grid, duo_scaling=duo_scaling, offload_device=None),
        QuantizationModifier(config_groups=_config_groups(groups), ignore=IGNORE),
    ]


def smoothquant(
    groups: list[Group], strength: float, weights: str, dampening_frac: float, actorder: str
) -> list[Any]:
    """SmoothQuant: moves activation outliers into the weights (per-channel scales folded into the
    preceding norm), then quantizes weights and activations."""
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    smooth = SmoothQuantModifier(smoothing_strength=strength)
    if weights == "gptq":
        return [smooth, *gptq(groups, dampening_frac, actorder)]
    return [smooth, *rtn(groups)]


def fp8_dynamic() -> list[Any]:
    """FP8 E4M3 weights with a scale per output channel; activations cast to FP8 per token at run time."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return [QuantizationModifier(scheme="FP8_DYNAMIC", targets=["Linear"], ignore=IGNORE)]


# --- running and saving ------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_pinning_without_accelerator():
    """llm-compressor 0.14's AWQ pins cached activations in page-locked memory for faster copies to the
    GPU, and torch refuses to pin without an accelerator. Pinning only speeds up those copies, so on a
    CPU-only worker it is skipped for the duration of the run (and restored after)."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def calibration_dataset(calibration: Any) -> Any:
    """The CalibrationSet as a datasets.Dataset of equal-length token windows (no padding needed)."""
    from datasets import Dataset

    ones = [1] * calibration.seq_len
    return Dataset.from_dict(
        {
            "input_ids": [list(s) for s in calibration.sequences],
            "attention_mask": [ones] * len(calibration.sequences),
        }
    )


def oneshot(model: Any, recipe: list[Any], job: QuantizeJob, calibration: Any = None) -> None:
    """Apply `recipe` to `model` in place. llm-compressor computes on the GPU when there is one, loading
    one decoder layer at a time (the sequential pipeline), and on the CPU otherwise."""
    import torch
    from llmcompressor import oneshot as llmc_oneshot

    torch.manual_seed(job.seed)
    kwargs: dict[str, Any] = {}
    if calibration is not None:
        kwargs = {
            "dataset": calibration_dataset(calibration),
            "num_calibration_samples": len(calibration.sequences),
            "max_seq_length": calibration.seq_len,
            # The CalibrationSet was already drawn with the job's seed; keep its order (reproducible).
            "shuffle_calibration_samples": False,
            "batch_size": max(1, min(len(calibration.sequences), BATCH_TOKENS // calibration.seq_len)),
        }
    with _no_pinning_without_accelerator():
        llmc_oneshot(model=model, recipe=recipe, **kwargs)


def save(model: Any, tokenizer: Any, out_dir: Path, **fields: Any) -> dict[str, Any]:
    """Write the compressed folder (packed safetensors, config.json with quantization_config, the
    tokenizer, tailor_format.json with `fields`); returns the metrics every method reports."""
    from tailor_runtime.ml.formats import COMPRESSED_TENSORS
    from tailor_runtime.ml.model_io import write_format

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, save_compressed=True, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_format(out_dir, COMPRESSED_TENSORS, **fields)
    weight_bytes = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return {"quantized_layers": len(quantizable_linears(model)), "weight_bytes": weight_bytes}


# --- mixed precision helpers (methods/auto_mixed.py) ---------------------------------------------------


def fake_quantize_weight(weight: Any, args: dict[str, Any]) -> Any:
    """`weight` rounded exactly as round-to-nearest stores it (min/max scales per group or channel), back
    in its dtype: what the model computes with after RTN quantization of this one layer."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    qargs = QuantizationArgs(**args)
    w = weight.detach().float()
    if qargs.strategy == "group":
        grouped = w.unflatten(-1, (w.shape[-1] // qargs.group_size, qargs.group_size))
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    else:
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale, zero_point = calculate_qparams(lo, hi, qargs)
    with torch.no_grad():
        return fake_quantize(w, scale, zero_point, qargs).to(weight.dtype)


def stored_bytes(layer: Any, args: dict[str, Any]) -> int:
    """Bytes one Linear layer takes in a compressed-tensors folder with weight args `args`: the weights
    packed into int32 words (num_bits per weight), a scale per group or row in the model's dtype, packed
    zero points when asymmetric, and the 2-element int64 shape."""
    rows, cols = layer.out_features, layer.in_features
    bits = args["num_bits"]
    groups = 1 if args.get("strategy") == "channel" else cols // args["group_size"]
    itemsize = layer.weight.element_size()
    packed = rows * math.ceil(cols * bits / 32) * 4
    scales = rows * groups * itemsize
    zero_points = 0 if args["symmetric"] else math.ceil(rows * bits / 32) * groups * 4
    return packed + scales + zero_points + 16
