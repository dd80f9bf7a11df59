"""The bitsandbytes folder formats, as transformers saves them: `bnb-nf4`, `bnb-fp4` and `bnb-int8`.

transformers serializes a bitsandbytes model to safetensors: for 4-bit (NF4, FP4) per Linear the packed
uint8 weight plus its quantization state (absmax, quant_map, nested statistics for double quantization,
and the non-tensor fields packed as JSON bytes in a uint8 tensor, never pickled); for LLM.int8 the int8
weight and its per-row scale (SCB). config.json carries the `quantization_config`, so `from_pretrained`
rebuilds the Linear4bit / Linear8bitLt layers on CPU. tailor_format.json:
{"format": "bnb-nf4" | "bnb-fp4" | "bnb-int8", "dtype": the compute dtype, ...}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def availability() -> tuple[bool, str]:
    """Whether bitsandbytes can run here (it runs NF4, FP4 and LLM.int8 on CPU since 0.46)."""
    from tailor_runtime.libraries import importable

    return importable("bitsandbytes")


def load(folder: Path, fmt: dict[str, Any], device: str = "cpu") -> Any:
    from transformers import AutoModelForCausalLM

    from tailor_runtime.errors import FailedPrecondition

    ok, why = availability()
    if not ok:
        raise FailedPrecondition(f"cannot load the {fmt['format']} model in {folder}: {why}")
    # bitsandbytes layers are placed by from_pretrained (a loaded 4-bit model refuses .to()).
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=device, use_safetensors=True, local_files_only=True
    )
    if device == "cpu":
        disable_cpu_repacking(model)
    return model.eval()


def disable_cpu_repacking(model: Any) -> None:
    """Keep bitsandbytes' standard NF4 layout for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in place on the first no-grad
    forward. That repacking asserts out_features % 32 == 0 (Llama MLPs such as stories260K's 172 fail) and
    is only fast with a kernel fetched from the Hugging Face hub at run time, which Tailor never does. The
    standard path dequantizes per matmul and works for every shape, on every CPU.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
