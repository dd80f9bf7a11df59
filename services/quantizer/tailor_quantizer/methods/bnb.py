"""bitsandbytes methods: NF4 and FP4 (4-bit, QLoRA's formats) and LLM.int8 (8-bit with fp16 outliers).

transformers quantizes the Linear layers while loading (BitsAndBytesConfig) and serializes the packed
weights and their quantization state with save_pretrained; the folder reloads with from_pretrained
(see `tailor_runtime.ml.formats.bnb`). All three run on CPU with bitsandbytes >= 0.46 and on CUDA.
Round-to-nearest per block: no calibration, deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from tailor_quantizer.methods.registry import Caps, QuantizeJob, register, require_full_precision

LIBRARIES = ("bitsandbytes", "transformers", "torch")


def _availability() -> tuple[bool, str]:
    from tailor_runtime.ml.formats.bnb import availability

    return availability()


def quantize_with_bnb(
    model_dir: Path, out_dir: Path, quantization_config: Any, fmt: str, job: QuantizeJob, **fields
) -> dict:
    """Load `model_dir` quantized by bitsandbytes, save it, write tailor_format.json; returns metrics."""
    import torch
    from transformers import AutoModelForCausalLM

    from tailor_runtime.errors import FailedPrecondition
    from tailor_runtime.ml.model_io import load_tokenizer, write_format

    ok, why = _availability()
    if not ok:
        raise FailedPrecondition(f"bitsandbytes methods cannot run here: {why}")
    require_full_precision(model_dir)
    job.progress(0.0, "quantizing", f"loading with bitsandbytes ({fmt})")
    device_map = "cuda:0" if job.device == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quantization_config,
        device_map=device_map,
        dtype=fields.get("compute_torch_dtype", torch.float32),
        use_safetensors=True,
        local_files_only=True,
    )
    job.progress(80.0, "saving", "writing safetensors")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(model_dir).save_pretrained(out_dir)
    layers = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
    fields.pop("compute_torch_dtype", None)
    write_format(out_dir, fmt, quantized_layers=layers, **fields)
    job.progress(100.0, "saving", "saved")
    weight_bytes = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return {"quantized_layers": layers, "weight_bytes": weight_bytes}


class FourBitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    double_quant: StrictBool = Field(
        default=True,
        description="Quantize the per-block scales too (about 0.4 bits/weight less; QLoRA's default).",
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="dtype the 4-bit weights are dequantized to for each matmul.",
    )


def _four_bit(
    model_dir: Path, out_dir: Path, cfg: FourBitConfig, job: QuantizeJob, quant_type: str, fmt: str
) -> dict:
    import torch
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, cfg.compute_dtype)
    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
    )
    return quantize_with_bnb(
        model_dir,
        out_dir,
        qc,
        fmt,
        job,
        dtype=cfg.compute_dtype,
        double_quant=cfg.double_quant,
        compute_torch_dtype=compute,
    )


def _caps(bits: int, fmt: str, description: str) -> Caps:
    return Caps(
        bits=(bits,),
        needs_calibration=False,
        devices=("cpu", "cuda"),
        output_format=fmt,
        libraries=LIBRARIES,
        description=description,
    )


@register(
    "nf4",
    caps=_caps(
        4,
        "bnb-nf4",
        "bitsandbytes NF4: Linear weights in 4-bit NormalFloat with a scale per block of 64, optionally "
        "double-quantized scales; embeddings and lm_head stay float. Matmuls dequantize on the fly.",
    ),
)
class Nf4:
    Config = FourBitConfig
    availability = staticmethod(_availability)

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: FourBitConfig, job: QuantizeJob) -> dict[str, Any]:
        from tailor_runtime.ml.formats import BNB_NF4

        return _four_bit(model_dir, out_dir, cfg, job, "nf4", BNB_NF4)


@register(
    "fp4",
    caps=_caps(
        4,
        "bnb-fp4",
        "bitsandbytes FP4: Linear weights as 4-bit floats (1 sign, 2 exponent, 1 mantissa bit) with a scale "
        "per block of 64; usually a little worse than NF4 on normally distributed weights.",
    ),
)
class Fp4:
    Config = FourBitConfig
    availability = staticmethod(_availability)

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: FourBitConfig, job: QuantizeJob) -> dict[str, Any]:
        from tailor_runtime.ml.formats import BNB_FP4

        return _four_bit(model_dir, out_dir, cfg, job, "fp4", BNB_FP4)


@register(
    "llm_int8",
    caps=_caps(
        8,
        "bnb-int8",
        "bitsandbytes LLM.int8(): int8 weights with a scale per row; at run time activation columns with "
        "an outlier above the threshold are multiplied in fp16, the rest in int8.",
    ),
)
class LlmInt8:
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        threshold: float = Field(
            default=6.0,
            gt=0,
            le=1000,
            description="Activation magnitude above which a column is an outlier kept in fp16 (paper: 6.0).",
        )

    availability = staticmethod(_availability)

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: Config, job: QuantizeJob) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        from tailor_runtime.ml.formats import BNB_INT8

        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.threshold)
        return quantize_with_bnb(
            model_dir, out_dir, qc, BNB_INT8, job, dtype="float32", threshold=cfg.threshold
        )
