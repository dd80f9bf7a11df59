"""The `compressed-tensors` folder format: what llm-compressor writes and vLLM loads.

A Hugging Face folder whose config.json carries `quantization_config` with `quant_method:
"compressed-tensors"` (packed int4/int8 weights with scales and zero points, or FP8 weights with
scales) in safetensors. transformers rebuilds the quantized Linear layers from it (the
compressed-tensors package must be installed); on CPU the weights are decompressed per matmul, which is
right for measuring quality, not for speed (vLLM is the fast runtime). tailor_format.json:
{"format": "compressed-tensors", "scheme": e.g. "W4A16", "method": "gptq", ...}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def availability() -> tuple[bool, str]:
    from tailor_runtime.libraries import importable

    return importable("compressed_tensors")


def load(folder: Path, fmt: dict[str, Any], device: str = "cpu") -> Any:
    """On CPU, transformers' model (decompressed to dense float weights on its first forward). On a GPU,
    4-bit symmetric integer weights become PackedInt4Linear layers, whose batch-1 product is
    int4_gemv's Triton kernel; the stored values are kept exactly. Other schemes (8-bit, zero points,
    FP8) run decompressed; `model.tailor_packed_int4` says which happened and why."""
    from transformers import AutoModelForCausalLM

    from tailor_runtime.errors import FailedPrecondition

    ok, why = availability()
    if not ok:
        raise FailedPrecondition(f"cannot load the compressed-tensors model in {folder}: {why}")
    # dtype "auto": the stored float parts (embeddings, head, norms, scales) keep the dtype they were saved in.
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype="auto", use_safetensors=True, local_files_only=True
    )
    if device != "cpu":
        model.tailor_packed_int4 = to_packed_int4(model)
        model.to(device)
    return model.eval()


def packed_int4_refusal(quantization_config: Any) -> str:
    """Why a compressed-tensors model cannot run as packed 4-bit layers ("" when it can): every config
    group must be 4-bit symmetric integer weights, by group or by channel, with float activations and no
    run-time column reordering (the layout has neither zero points nor a g_idx)."""
    cfg = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    groups = cfg.get("config_groups") or {}
    if not groups:
        return "its quantization_config has no config_groups"
    for name, group in groups.items():
        weights = group.get("weights") or {}
        why = []
        if weights.get("type") != "int" or weights.get("num_bits") != 4:
            why.append(f"weights are {weights.get('num_bits')}-bit {weights.get('type')}, not 4-bit int")
        if not weights.get("symmetric", False):
            why.append("weights have zero points (asymmetric)")
        if weights.get("strategy") not in ("group", "channel"):
            why.append(f"strategy {weights.get('strategy')!r} is neither 'group' nor 'channel'")
        if weights.get("actorder") == "group":
            why.append("columns are reordered at run time (actorder 'group')")
        if group.get("input_activations") or group.get("output_activations"):
            why.append("activations are quantized too")
        if why:
            return f"{name}: " + "; ".join(why)
    return ""


def to_packed_int4(model: Any, kernel: str = "auto") -> dict[str, Any]:
    """Replace a freshly loaded compressed-tensors model's 4-bit Linear layers by PackedInt4Linear, in
    place, keeping every quantized value and scale (so the outputs are those of the stored model), and
    drop the decompress-on-first-forward hook that would otherwise expand them to dense float weights.

    Returns {"packed_layers": n} or, when the scheme does not fit the layout, {"packed_layers": 0,
    "not_packed": why} with the model untouched."""
    import torch
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32

    from tailor_runtime.ml.packed_int4 import PackedInt4Linear

    why = packed_int4_refusal(getattr(model.config, "quantization_config", None) or {})
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_packed")
    ]
    if not why and not layers:
        why = "no layer holds packed weights (already decompressed?)"
    if why:
        return {"packed_layers": 0, "not_packed": why}
    for name, module in layers:
        n, k = (int(d) for d in module.weight_shape)
        q = unpack_from_int32(module.weight_packed.data, 4, torch.Size([n, k]))
        scales = module.weight_scale.data
        bias = None if module.bias is None else module.bias.data
        group = module.quantization_scheme.weights.group_size or -1  # None: one scale per row
        layer = PackedInt4Linear.from_quantized(q, scales, group, bias, kernel)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    hook = getattr(model, "ct_decompress_hook", None)
    if hook is not None:  # nothing is left for it to decompress
        hook.remove()
        del model.ct_decompress_hook
    return {"packed_layers": len(layers)}
