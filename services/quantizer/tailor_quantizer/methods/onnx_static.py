"""int8_static: static INT8 in ONNX Runtime, activation ranges calibrated on the request's text.

The model is exported to an ONNX decoder with past key/values (`tailor_runtime.ml.onnx`), checked
against PyTorch, fused by ONNX Runtime's transformer optimizer, then quantized by ONNX Runtime's
`quantize_static` in QDQ form: int8 weights (per tensor or per output channel) and int8 activations at
the inputs of every MatMul by a weight, output embedding included, with ranges from the calibration
sequences (min-max, entropy or percentile calibrator). The output is an `onnx` model folder, which
`load_causal_lm` runs in ONNX Runtime, so the accuracy gate measures it like any other method's output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from tailor_quantizer.methods.registry import Caps, QuantizeJob, importable, register, require_full_precision

LIBRARIES = ("onnxruntime", "onnx", "onnxscript", "torch", "transformers")
OPSET = 18


@register(
    "int8_static",
    caps=Caps(
        bits=(8,),
        needs_calibration=True,
        devices=("cpu",),
        output_format="onnx",
        libraries=LIBRARIES,
        description=(
            "Static INT8 in ONNX Runtime (QDQ): int8 weights and int8 activations with ranges calibrated on "
            "sample text (min-max, entropy or percentile); attention and norms stay float. Written as an "
            "ONNX model with a KV cache."
        ),
    ),
)
class Int8Static:
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        calibrator: Literal["minmax", "entropy", "percentile"] = Field(
            default="minmax",
            description="How activation ranges are chosen from the calibration data: min-max, the range "
            "minimizing KL divergence (entropy), or a percentile of the absolute values.",
        )
        percentile: float = Field(
            default=99.999, gt=50, le=100, description="The percentile calibrator's percentile."
        )
        per_channel: StrictBool = Field(
            default=True,
            description="One weight scale per output channel (more accurate) instead of one per tensor.",
        )

    @staticmethod
    def availability() -> tuple[bool, str]:
        return importable("onnxruntime", "onnx", "onnxscript")

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: Config, job: QuantizeJob) -> dict[str, Any]:
        import shutil
        import tempfile

        from tailor_runtime.errors import InvalidArgument
        from tailor_runtime.ml.model_io import load_causal_lm
        from tailor_runtime.ml.onnx import MODEL_FILE, folder, optimize, verify
        from tailor_runtime.ml.onnx.export import export_optimized, kv_shape

        require_full_precision(model_dir)
        if job.calibration is None:
            raise InvalidArgument("int8_static needs calibration data (calibration_data in the request)")
        job.progress(0.0, "loading", f"loading {Path(model_dir).name}")
        model, tokenizer = load_causal_lm(model_dir)
        model = model.float()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        folder.write_config(out_dir, model_dir, tokenizer)
        with tempfile.TemporaryDirectory(prefix="tailor-int8-static-") as tmp:
            shutil.copyfile(out_dir / "config.json", Path(tmp) / "config.json")
            job.progress(10.0, "exporting", "ONNX with past key/values, checked against PyTorch")
            graph, info = export_optimized(model, Path(tmp), OPSET, verify.sample_batches(tokenizer, 2))
            job.progress(
                40.0, "calibrating", f"{cfg.calibrator} on {len(job.calibration.sequences)} sequences"
            )
            reader = optimize.TokenReader(job.calibration.sequences, *kv_shape(model.config))
            stats = optimize.quantize_int8_static(
                graph, out_dir / MODEL_FILE, reader, cfg.calibrator, cfg.percentile, cfg.per_channel
            )
        job.progress(95.0, "saving", "format")
        folder.write_format(
            out_dir, "onnx", MODEL_FILE, "int8-static-qdq", opset=OPSET, source_format="hf-safetensors"
        )
        return {
            "quantized_layers": stats["quantized_matmuls"],
            "weight_bytes": sum(p.stat().st_size for p in out_dir.glob(MODEL_FILE + "*")),
            "calibrator": cfg.calibrator,
            "calibrated_tensors": stats["calibrated_tensors"],
            "calibration_sequences": stats["calibration_sequences"],
            "exported_max_abs_diff": info["exported"]["max_abs_diff"],
            "fused_operators": sum(info["fused_operators"].values()),
        }
