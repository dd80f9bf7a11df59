"""nf4: bitsandbytes 4-bit NormalFloat weights (QLoRA's format), saved as safetensors.

transformers quantizes the Linear layers while loading (BitsAndBytesConfig) and serializes the packed
weights and their quantization state with save_pretrained; the folder reloads with from_pretrained
(see `tailor_runtime.ml.formats.bnb_nf4`). Runs on CPU with bitsandbytes >= 0.46.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from tailor_quantizer.methods.registry import Caps, register, require_full_precision
from tailor_runtime.progress import ProgressFn


@register(
    "nf4",
    caps=Caps(
        bits=4,
        needs_calibration=False,
        devices=("cpu",),  # run() quantizes on CPU
        output_format="bnb-nf4",
        libraries=("bitsandbytes", "transformers", "torch"),
        description=(
            "bitsandbytes NF4: Linear weights in 4-bit NormalFloat with a scale per block of 64, optionally "
            "double-quantized scales; embeddings and lm_head stay float. Matmuls dequantize on the fly."
        ),
    ),
)
class Nf4:
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        double_quant: StrictBool = Field(
            default=True,
            description="Quantize the per-block scales too (about 0.4 bits/weight less; QLoRA's default).",
        )
        compute_dtype: Literal["float32", "bfloat16"] = Field(
            default="float32",
            description="dtype the 4-bit weights are dequantized to for each matmul.",
        )

    @staticmethod
    def availability() -> tuple[bool, str]:
        from tailor_runtime.ml.formats.bnb_nf4 import availability

        return availability()

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: Config, progress: ProgressFn) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from tailor_runtime.errors import FailedPrecondition
        from tailor_runtime.ml.formats import BNB_NF4
        from tailor_runtime.ml.model_io import load_tokenizer, write_format

        ok, why = Nf4.availability()
        if not ok:
            raise FailedPrecondition(f"nf4 cannot run here: {why}")
        require_full_precision(model_dir)
        compute = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.compute_dtype]
        progress(0.0, "quantizing", "loading with 4-bit NF4 quantization")
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=cfg.double_quant,
                bnb_4bit_compute_dtype=compute,
            ),
            device_map="cpu",
            dtype=compute,
            use_safetensors=True,
            local_files_only=True,
        )
        progress(80.0, "saving", "writing safetensors")
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir, safe_serialization=True)
        load_tokenizer(model_dir).save_pretrained(out_dir)
        layers = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
        write_format(
            out_dir, BNB_NF4, dtype=cfg.compute_dtype, double_quant=cfg.double_quant, quantized_layers=layers
        )
        progress(100.0, "saving", "saved")
        weight_bytes = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
        return {"quantized_layers": layers, "weight_bytes": weight_bytes}
