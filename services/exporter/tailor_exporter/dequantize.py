"""Turn quantized Linear layers back into float32 nn.Linear so a model can be exported as a plain graph.

The float weights are the quantized weights decoded exactly (int8 * scale, or the NF4 code book
times the block scale): the exported graph computes with the rounded weights, not the originals,
which are gone. Activations are no longer quantized (torch dynamic int8 quantizes them per call).
"""

from __future__ import annotations

import copy
from typing import Any

from tailor_runtime.errors import FailedPrecondition


def _replace(model: Any, decode: Any) -> int:
    """Swap every module for which decode(module) gives (weight, bias) with a float32 nn.Linear."""
    import torch

    targets = [(name, module) for name, module in model.named_modules() if decode(module) is not None]
    for name, module in targets:
        weight, bias = decode(module)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.float())
            if bias is not None:
                linear.bias.copy_(bias.float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return len(targets)


def _int8_dynamic_linear(module: Any) -> tuple[Any, Any] | None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    if not isinstance(module, DynamicQuantizedLinear):
        return None
    return module.weight().dequantize(), module.bias()


def _bnb_4bit_linear(module: Any) -> tuple[Any, Any] | None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    if not isinstance(module, bnb.nn.Linear4bit):
        return None
    weight = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return weight, module.bias


def dequantize_int8_dynamic(model: Any) -> int:
    """Replace torch dynamic-quantized Linear layers in place; returns how many were replaced."""
    return _replace(model, _int8_dynamic_linear)


def dequantize_bnb_4bit(model: Any) -> int:
    """Replace bitsandbytes 4-bit Linear layers (NF4 or FP4) in place; returns how many were replaced."""
    replaced = _replace(model, _bnb_4bit_linear)
    quantizer = getattr(model, "hf_quantizer", None)
    if replaced and quantizer is not None:
        # transformers refuses .float() while it believes the model is quantized; this is its own reset.
        quantizer.remove_quantization_config(model)
    return replaced


def float32_model(source: Any, source_format: str) -> Any:
    """The float32 model of a loaded source, in eval mode: `source` itself (cast) for hf-safetensors; for
    int8-dynamic and bnb-nf4, a copy whose quantized Linear layers are decoded (the source is untouched)."""
    if source_format == "hf-safetensors":
        return source.float().eval()
    model = copy.deepcopy(source)
    decode = dequantize_int8_dynamic if source_format == "int8-dynamic" else dequantize_bnb_4bit
    if decode(model) == 0:
        raise FailedPrecondition(f"the {source_format} model has no quantized Linear layers to decode")
    return model.float().eval()
