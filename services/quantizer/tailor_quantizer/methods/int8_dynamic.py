"""int8_dynamic: int8 weights (symmetric, per output channel), activations quantized at run time.

The folder format and its loader live in `tailor_runtime.ml.formats.int8_dynamic`; this module only
exposes it as a quantization method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tailor_quantizer.methods.registry import Caps, QuantizeJob, register, require_full_precision


@register(
    "int8_dynamic",
    caps=Caps(
        bits=(8,),
        needs_calibration=False,
        devices=("cpu",),
        output_format="int8-dynamic",
        libraries=("torch",),
        description=(
            "Dynamic INT8: Linear weights stored as int8 with a float scale per output channel; activations "
            "are quantized per batch at run time and matmuls run in int8 on CPU. Embeddings and lm_head "
            "stay float32."
        ),
    ),
)
class Int8Dynamic:
    class Config(BaseModel):
        """No options: symmetric per-channel scales computed from the weights themselves."""

        model_config = ConfigDict(extra="forbid", frozen=True)

    @staticmethod
    def availability() -> tuple[bool, str]:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return False, "torch is not installed"
        return True, ""

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: Config, job: QuantizeJob) -> dict[str, Any]:
        import torch

        from tailor_runtime.ml.formats.int8_dynamic import save_quantized
        from tailor_runtime.ml.model_io import load_causal_lm

        require_full_precision(model_dir)
        job.progress(0.0, "loading", f"loading {Path(model_dir).name}")
        model, tokenizer = load_causal_lm(model_dir)
        model = model.to(torch.float32)  # scales are computed from the float32 values
        return save_quantized(model, tokenizer, out_dir, job.progress)
