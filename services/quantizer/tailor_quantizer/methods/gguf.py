"""GGUF methods: llama.cpp's Q8_0 and Q4_K_M, written as a `gguf` folder (see tailor_runtime.ml.formats.gguf).

The file writing lives in `tailor_runtime.ml.gguf_io` (llama.cpp's own converter, every family it knows),
shared with the exporter; these methods only make
the formats selectable as quantization methods, so a GGUF can be measured (perplexity, size) and compared
with the other methods before it is exported for llama.cpp or Ollama. Round-to-nearest per block, no
calibration (no importance matrix), deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tailor_quantizer.methods.registry import Caps, QuantizeJob, importable, register, require_full_precision


class GgufConfig(BaseModel):
    """No options: the tensor types follow llama.cpp's rules for the file type."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _converter_and(*modules: str) -> tuple[bool, str]:
    """Both GGUF methods start from llama.cpp's converter (tailor_runtime.ml.llama_cpp_convert)."""
    from tailor_runtime.ml.llama_cpp_convert import converter_availability

    ok, why = importable(*modules)
    return converter_availability() if ok else (ok, why)


def _quantize(model_dir: Path, out_dir: Path, gguf_type: str, job: QuantizeJob) -> dict[str, Any]:
    from tailor_runtime.ml.formats.gguf import save_gguf_folder

    require_full_precision(model_dir)
    job.progress(0.0, "quantizing", f"writing GGUF {gguf_type}")
    info = save_gguf_folder(model_dir, out_dir, gguf_type)
    job.progress(100.0, "saving", f"{info['bytes']} bytes")
    return {
        "quantized_layers": info["quantized_layers"],
        "weight_bytes": info["bytes"],
        "tensor_types": info["tensor_types"],
        # Tensors whose rows do not fit the type's blocks, kept in another type (see gguf_io).
        "fallback_tensors": len(info["fallbacks"]),
    }


@register(
    "gguf_q8_0",
    caps=Caps(
        bits=(8,),
        needs_calibration=False,
        devices=("cpu",),
        output_format="gguf",
        libraries=("gguf", "torch", "transformers"),
        description=(
            "GGUF Q8_0 (llama.cpp / Ollama): 8-bit weights with one fp16 scale per block of 32, about 8.5 "
            "bits per weight; norms stay F32, rows not a multiple of 32 wide fall back to F16. Written "
            "by llama.cpp's own converter; measured here by dequantizing into PyTorch."
        ),
    ),
)
class GgufQ8_0:
    Config = GgufConfig

    @staticmethod
    def availability() -> tuple[bool, str]:
        return _converter_and("gguf", "numpy")

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: GgufConfig, job: QuantizeJob) -> dict[str, Any]:
        return _quantize(model_dir, out_dir, "Q8_0", job)


@register(
    "gguf_q4_k_m",
    caps=Caps(
        bits=(4,),
        needs_calibration=False,
        devices=("cpu",),
        output_format="gguf",
        libraries=("gguf", "llama-cpp-python", "torch", "transformers"),
        description=(
            "GGUF Q4_K_M (llama.cpp / Ollama): Q4_K (4-bit, super-blocks of 256), Q6_K for the output and for "
            "attn_v/ffn_down in the first and last eighth of the layers and every third one between; made by "
            "llama.cpp's own quantizer. Rows not a multiple of 256 wide fall back to Q5_0/Q8_0, or F16 "
            "when not a multiple of 32 (so a tiny model gets no K-quants at all)."
        ),
    ),
)
class GgufQ4KM:
    Config = GgufConfig

    @staticmethod
    def availability() -> tuple[bool, str]:
        from tailor_runtime.ml.gguf_io import llama_cpp_availability

        ok, why = _converter_and("gguf", "numpy")
        return llama_cpp_availability() if ok else (ok, why)

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: GgufConfig, job: QuantizeJob) -> dict[str, Any]:
        return _quantize(model_dir, out_dir, "Q4_K_M", job)
