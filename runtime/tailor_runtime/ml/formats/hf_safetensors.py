"""Plain Hugging Face folders: config.json + *.safetensors, loaded in the dtype they were saved in."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def torch_dtype(name: str):
    """'float32' / 'bfloat16' / 'float16' -> torch dtype (kept strict: a typo must not load fp32 silently)."""
    import torch

    from tailor_runtime.errors import InvalidArgument

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise InvalidArgument(f"unsupported dtype {name!r} in tailor_format.json", choices=dtypes)
    return dtypes[name]


def load(folder: Path, fmt: dict[str, Any], device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch_dtype(fmt.get("dtype", "float32")),
        use_safetensors=True,  # never fall back to pickled *.bin weights
        local_files_only=True,
        device_map=None if device == "cpu" else device,
    )
    return model.eval()
