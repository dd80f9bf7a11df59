"""bf16: cast every weight to bfloat16. Halves the size, keeps the exponent range of float32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tailor_quantizer.methods.registry import Caps, register, require_full_precision
from tailor_runtime.progress import ProgressFn


@register(
    "bf16",
    caps=Caps(
        bits=16,
        needs_calibration=False,
        devices=("cpu",),  # run() quantizes on CPU
        output_format="hf-safetensors",
        libraries=("torch", "transformers"),
        description="Cast all weights to bfloat16 (round to nearest even); a plain Hugging Face folder.",
    ),
)
class Bf16:
    class Config(BaseModel):
        """No options: the cast is fully determined."""

        model_config = ConfigDict(extra="forbid", frozen=True)

    @staticmethod
    def availability() -> tuple[bool, str]:
        return True, ""

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: Config, progress: ProgressFn) -> dict[str, Any]:
        from tailor_runtime.ml.model_io import load_causal_lm, save_hf_model

        require_full_precision(model_dir)
        progress(0.0, "loading", f"loading {Path(model_dir).name}")
        model, tokenizer = load_causal_lm(model_dir)
        progress(50.0, "quantizing", "casting to bfloat16")
        save_hf_model(model, tokenizer, out_dir, dtype="bfloat16")
        weight_bytes = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))
        progress(100.0, "saving", "saved")
        import torch

        linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        tensors = sum(1 for _ in model.parameters())
        return {"quantized_layers": linears, "cast_tensors": tensors, "weight_bytes": weight_bytes}
