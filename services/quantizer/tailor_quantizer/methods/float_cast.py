"""bf16 and fp16: cast every weight to a 16-bit float. Halves the size; no calibration, no library.

bfloat16 keeps float32's exponent range (safe for any model); float16 keeps 3 more mantissa bits but
overflows above 65504, so a weight out of its range fails the run instead of turning into inf.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tailor_quantizer.methods.registry import Caps, QuantizeJob, register, require_full_precision


class _NoOptions(BaseModel):
    """No options: the cast is fully determined."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def cast_and_save(model_dir: Path, out_dir: Path, dtype: str, job: QuantizeJob) -> dict[str, Any]:
    import torch

    from tailor_runtime.errors import FailedPrecondition
    from tailor_runtime.ml.model_io import load_causal_lm, save_hf_model

    require_full_precision(model_dir)
    job.progress(0.0, "loading", f"loading {Path(model_dir).name}")
    model, tokenizer = load_causal_lm(model_dir)
    if dtype == "float16":
        limit = torch.finfo(torch.float16).max
        for name, param in model.named_parameters():
            if param.detach().abs().max().item() > limit:
                raise FailedPrecondition(
                    f"{name} has values beyond float16's range (±{limit:.0f}); use bf16 instead"
                )
    job.progress(50.0, "quantizing", f"casting to {dtype}")
    save_hf_model(model, tokenizer, out_dir, dtype=dtype)
    weight_bytes = sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))
    job.progress(100.0, "saving", "saved")
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    tensors = sum(1 for _ in model.parameters())
    return {"quantized_layers": linears, "cast_tensors": tensors, "weight_bytes": weight_bytes}


def _caps(description: str) -> Caps:
    return Caps(
        bits=(16,),
        needs_calibration=False,
        devices=("cpu", "cuda"),
        output_format="hf-safetensors",
        libraries=("torch", "transformers"),
        description=description,
    )


@register("bf16", caps=_caps("Cast all weights to bfloat16 (round to nearest even); a plain HF folder."))
class Bf16:
    Config = _NoOptions

    @staticmethod
    def availability() -> tuple[bool, str]:
        return True, ""

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: _NoOptions, job: QuantizeJob) -> dict[str, Any]:
        return cast_and_save(model_dir, out_dir, "bfloat16", job)


@register(
    "fp16",
    caps=_caps(
        "Cast all weights to float16 (IEEE half; refuses weights beyond ±65504); a plain HF folder.",
    ),
)
class Fp16:
    Config = _NoOptions

    @staticmethod
    def availability() -> tuple[bool, str]:
        return True, ""

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: _NoOptions, job: QuantizeJob) -> dict[str, Any]:
        return cast_and_save(model_dir, out_dir, "float16", job)
