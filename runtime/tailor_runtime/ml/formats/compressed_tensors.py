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


def load(folder: Path, fmt: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    from tailor_runtime.errors import FailedPrecondition

    ok, why = availability()
    if not ok:
        raise FailedPrecondition(f"cannot load the compressed-tensors model in {folder}: {why}")
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    return model.eval()
