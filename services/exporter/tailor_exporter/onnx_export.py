"""ONNX exports (onnx, onnx-fp16, onnx-int8, onnx-int8-static, ort), verified before they are published.

Every variant takes the same road through `tailor_runtime.ml.onnx`: the source's float32 model is
exported with past key/values (opset >= 17, dynamic batch, sequence and past length) and checked
against PyTorch ("exported", float32 tolerance); ONNX Runtime's transformer optimizer fuses it; then the
variant's transformation (none, FP16, INT8 dynamic, INT8 static QDQ calibrated on a dataset, ORT format)
gives the published graph, which is checked against the float32 model with the variant's tolerance
("published"), with and without past, on batches of real text. A quantized source is also compared
with itself ("source"). Over a tolerance, VerificationFailed names the numbers and `out_dir` is never
created: the export is built in a temporary folder beside it and renamed into place only after it passed.

Sources: hf-safetensors in any dtype (exported in float32); int8-dynamic (its int8 weights decoded to
float; the `onnx` variant then quantizes exactly its layers again with ONNX Runtime, on the same grid,
unless `dequantize=true`); bnb-nf4 only with `dequantize=true`, as its NF4-rounded weights in float32
(ONNX Runtime's 4-bit MatMulNBits uses a linear int4 grid, not NF4's code book).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tailor_exporter.dequantize import float32_model
from tailor_exporter.registry import (
    ExportFormat,
    ExportJob,
    Tolerance,
    check_destination,
    move_into_place,
    register,
    staged,
)
from tailor_runtime.errors import FailedPrecondition, InvalidArgument
from tailor_runtime.ml.onnx import MODEL_FILE, ORT_FILE
from tailor_runtime.ml.onnx.export import FLOAT32_ATOL, FLOAT32_MIN_TOP1

SOURCE_FORMATS = ("hf-safetensors", "int8-dynamic", "bnb-nf4")
LIBRARIES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")

# Default tolerances against the float32 model, by the weights of the published graph. float32: the
# graph computes the same thing in another engine. float16: measured 0.08 max |diff| on stories260K
# (logits up to ~20), top-1 1.0. int8: the engines quantize activations differently on every call; on
# stories260K, whose 64-wide layers make each activation error large, dynamic int8 agrees with float32 at
# ~95% of positions (max |diff| ~2.6), static int8 at 89-95% (max ~4.4, depending on the calibrator); a
# broken graph agrees at about 1/vocab. Larger models are far closer.
TOLERANCES = {
    "float32": Tolerance(atol=FLOAT32_ATOL, min_top1_agreement=FLOAT32_MIN_TOP1),
    "float16": Tolerance(atol=0.5, min_top1_agreement=0.97),
    "int8-dynamic": Tolerance(atol=10.0, min_top1_agreement=0.85),
    "int8-static-qdq": Tolerance(atol=10.0, min_top1_agreement=0.80),
}
# An int8 graph checked against its int8 PyTorch source: two engines, each rounding activations its own
# way, so their disagreements add up. Measured on the pipeline's 4-step fine-tune of stories260K: 0.825
# (each about 0.9 against float32). The published graph is also checked against float32 above, which is
# what catches a broken graph (about 1/vocab agreement).
INT8_CROSS_ENGINE = Tolerance(atol=10.0, min_top1_agreement=0.75)


class OnnxExportConfig(BaseModel):
    """Options of every ONNX variant (the `config` Struct of an ExportRequest)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    opset: int = Field(18, ge=17, description="ONNX opset of the exported graph.")
    dequantize: bool = Field(
        False,
        description="Export quantized weights (int8-dynamic, bnb-nf4) decoded to float32; required for "
        "bnb-nf4. Without it, an int8-dynamic source keeps its int8 layers in the `onnx` variant.",
    )
    optimize: bool = Field(True, description="Run ONNX Runtime's transformer optimizer (fusions).")
    atol: float | None = Field(
        None, ge=0, description="Max |logit difference| against the source; default: the variant's."
    )
    min_top1_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Min share of positions with the same next token; default: the variant's.",
    )
    verify_batches: int = Field(
        3, ge=2, description="Sample batches of real text (different shapes) to verify on."
    )

    @field_validator("opset", "verify_batches", mode="before")
    @classmethod
    def _whole_floats_are_ints(cls, value: Any) -> Any:
        # A protobuf Struct carries every number as a double: accept 18.0 for 18, still refuse 18.5 and "18".
        return int(value) if isinstance(value, float) and value.is_integer() else value


class Int8Config(OnnxExportConfig):
    per_channel: bool = Field(
        True, description="One weight scale per output channel (more accurate) instead of one per tensor."
    )


class Int8StaticConfig(Int8Config):
    calibration_data: str = Field(
        "", description="Id of a text or JSONL dataset artifact whose tokens calibrate the activation ranges."
    )
    calibrator: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="How activation ranges are chosen: min-max, KL divergence, or a percentile."
    )
    percentile: float = Field(99.999, gt=50, le=100, description="The percentile calibrator's percentile.")
    calibration_samples: int = Field(64, ge=8, le=4096, description="Calibration sequences.")
    calibration_seq_len: int = Field(256, ge=16, le=8192, description="Tokens per calibration sequence.")


class OrtConfig(Int8Config):
    int8: bool = Field(
        False, description="Quantize to dynamic int8 before converting (smaller, faster on CPU)."
    )


def export_onnx(
    model_dir: Path, out_dir: Path, cfg: OnnxExportConfig, job: ExportJob, variant: str = "onnx"
) -> dict[str, Any]:
    """Export `model_dir` to `out_dir` (which must not exist yet or be empty) as a verified `variant`."""
    from tailor_runtime.ml.model_io import folder_size_bytes, load_causal_lm, read_format
    from tailor_runtime.ml.onnx import folder, verify

    model_dir, out_dir, progress = Path(model_dir), Path(out_dir), job.progress
    source_format = read_format(model_dir)["format"]
    _check_supported(source_format, cfg)
    check_destination(out_dir)

    started = time.monotonic()
    progress(2.0, "loading", f"loading {model_dir.name} ({source_format})")
    source, tokenizer = load_causal_lm(model_dir)
    float_model = float32_model(source, source_format)  # `source` itself when it already is float
    batches = verify.sample_batches(tokenizer, cfg.verify_batches)
    calibration = _calibration(job, cfg, tokenizer, float_model) if variant == "onnx-int8-static" else None

    with staged(out_dir) as work:
        folder.write_config(work, model_dir, tokenizer)  # sessions read config.json while verifying
        checks, weights, model_file, stats = _build(
            work, source, source_format, float_model, cfg, variant, batches, calibration, progress
        )
        progress(95.0, "writing", "format and verification")
        name = "ort" if variant == "ort" else "onnx"
        fmt = folder.write_format(
            work, name, model_file, weights, opset=cfg.opset, source_format=source_format, variant=variant
        )
        folder.write_verification(work, checks, batches)
        files = {p.name: p.stat().st_size for p in sorted(work.iterdir())}
        move_into_place(work, out_dir)

    progress(100.0, "done", f"exported {out_dir.name}")
    return {
        "out_dir": str(out_dir),
        "format": fmt,
        "files": files,
        "size_on_disk_mb": folder_size_bytes(out_dir) / 2**20,
        "verification": {**_headline(checks), "checks": checks},
        "export_s": time.monotonic() - started,
        **stats,
    }


def _build(
    work: Path,
    source: Any,
    source_format: str,
    float_model: Any,
    cfg: OnnxExportConfig,
    variant: str,
    batches: list[Any],
    calibration: Any,
    progress: Any,
) -> tuple[dict[str, Any], str, str, dict[str, Any]]:
    """The graph of `variant` in `work`, verified: (checks, weights, model file, statistics)."""
    from tailor_runtime.ml.onnx import optimize, verify
    from tailor_runtime.ml.onnx.export import export_optimized, kv_shape
    from tailor_runtime.ml.onnx.session import OnnxCausalLM

    progress(10.0, "exporting", f"torch.onnx.export with past key/values, opset {cfg.opset}, then optimizing")
    graph, info = export_optimized(float_model, work, cfg.opset, batches, optimize=cfg.optimize)
    checks = {"exported": info["exported"]}
    stats: dict[str, Any] = {"fused_operators": info["fused_operators"]}
    scopes = info["matmul_scopes"]

    weights, carried_int8 = "float32", source_format == "int8-dynamic" and not cfg.dequantize
    out = work / MODEL_FILE
    progress(55.0, "transforming", variant)
    if variant == "onnx-fp16":
        optimize.to_fp16(graph, out)
        weights = "float16"
    elif carried_int8 and variant == "onnx":
        # Exactly the layers that are int8 in the source (lm_head and embeddings stay float there),
        # per channel and symmetric: the int8-dynamic folder's own grid, so the values come back exactly.
        nodes = _nodes_of(_quantized_layers(source), scopes)
        optimize.quantize_int8_dynamic(graph, out, per_channel=True, nodes=nodes)
        weights = "int8-dynamic"
    elif variant == "onnx-int8" or (variant == "ort" and cfg.int8):
        stats["quantized_matmuls"] = optimize.quantize_int8_dynamic(graph, out, per_channel=cfg.per_channel)
        weights = "int8-dynamic"
    elif variant == "onnx-int8-static":
        progress(55.0, "calibrating", f"{cfg.calibrator}, {len(calibration.sequences)} sequences")
        reader = optimize.TokenReader(calibration.sequences, *kv_shape(float_model.config))
        stats["calibration"] = optimize.quantize_int8_static(
            graph, out, reader, cfg.calibrator, cfg.percentile, cfg.per_channel
        )
        stats["calibration"].update(calibration.manifest_stats())
        weights = "int8-static-qdq"
    else:
        optimize.save(optimize.load(graph), out)  # re-saved: an external data file takes the new name
    if graph.exists():
        optimize.remove(graph)
    model_file = MODEL_FILE
    if variant == "ort":
        progress(75.0, "converting", "ORT format")
        optimize.to_ort_format(out, work)
        optimize.remove(out)
        model_file = ORT_FILE

    progress(80.0, "verifying", f"the published {weights} graph against PyTorch")
    tolerance = _tolerance(cfg, weights)
    checks["published"] = verify.compare(OnnxCausalLM(work, model_file), float_model, batches)
    verify.enforce("published", checks["published"], tolerance.atol, tolerance.min_top1_agreement)
    if source is not float_model:
        # The quantized source is the reference for what the graph must compute when it carries the
        # source's own weights (int8 layers; NF4 values decoded exactly); otherwise for information.
        result = verify.compare(OnnxCausalLM(work, model_file), source, batches)
        if (carried_int8 and variant == "onnx") or source_format == "bnb-nf4":
            bound = tolerance
            if source_format == "int8-dynamic" and cfg.min_top1_agreement is None:
                bound = INT8_CROSS_ENGINE
            verify.enforce("source", result, bound.atol, bound.min_top1_agreement)
        else:
            result["enforced"] = False
        checks["source"] = result
    return checks, weights, model_file, stats


def _tolerance(cfg: OnnxExportConfig, weights: str) -> Tolerance:
    default = TOLERANCES[weights]
    return Tolerance(
        atol=default.atol if cfg.atol is None else cfg.atol,
        min_top1_agreement=default.min_top1_agreement
        if cfg.min_top1_agreement is None
        else cfg.min_top1_agreement,
    )


def _headline(checks: dict[str, Any]) -> dict[str, Any]:
    """The published graph against its source, flat: the enforced source check, else the published one."""
    source = checks.get("source", {})
    check = source if source.get("passed") else checks["published"]
    # The floors beside the numbers (set by verify.enforce), so a summary shows what the check required.
    keys = ("max_abs_diff", "top1_agreement", "positions", "passed", "atol", "min_top1_agreement")
    return {k: check[k] for k in keys if k in check}


def _check_supported(source_format: str, cfg: OnnxExportConfig) -> None:
    if source_format not in SOURCE_FORMATS:
        raise InvalidArgument(
            f"cannot export a model in format {source_format!r} to ONNX", choices=SOURCE_FORMATS
        )
    if source_format == "bnb-nf4" and not cfg.dequantize:
        raise InvalidArgument(
            "a bnb-nf4 model cannot be exported to ONNX as NF4 (ONNX Runtime's 4-bit kernels use a linear "
            "int4 grid, not NF4's code book). Either set dequantize=true to export its NF4-rounded weights in "
            "float32, or export its parent (hf-safetensors) model with format onnx-int8 (int8 quantized by "
            "ONNX Runtime), or an int8-dynamic model made from it"
        )


def _calibration(job: ExportJob, cfg: Int8StaticConfig, tokenizer: Any, model: Any) -> Any:
    """The CalibrationSet of onnx-int8-static, sampled from the request's dataset file with its seed."""
    from tailor_runtime.ml.calibration import build_calibration_set, read_documents
    from tailor_runtime.store.manifest import sha256_file

    if job.calibration_file is None:
        raise InvalidArgument(
            "onnx-int8-static needs calibration_data: the id of a text or JSONL dataset artifact whose text "
            "calibrates the activation ranges (or export with onnx-int8, which needs none)"
        )
    return build_calibration_set(
        tokenizer,
        read_documents(job.calibration_file),
        cfg.calibration_samples,
        cfg.calibration_seq_len,
        job.seed,
        sha256_file(job.calibration_file),
        max_seq_len=model.config.max_position_embeddings,
    )


def _quantized_layers(model: Any) -> set[str]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return {name for name, module in model.named_modules() if isinstance(module, DynamicQuantizedLinear)}


def _nodes_of(layers: set[str], matmul_scopes: dict[str, set[str]]) -> list[str]:
    """The MatMul/Gemm nodes exported from `layers`; there must be one per layer."""
    nodes = sorted(node for node, scopes in matmul_scopes.items() if scopes & layers)
    if len(nodes) != len(layers):
        raise FailedPrecondition(
            f"found {len(nodes)} ONNX MatMul nodes for the source's {len(layers)} int8 layers (the exporter's "
            "name scopes changed?); export with dequantize=true to get a float32 graph instead"
        )
    return nodes


def _register(
    name: str, config: type[OnnxExportConfig], weights: str, description: str, **extra: Any
) -> None:
    def run(model_dir: Path, out_dir: Path, cfg: OnnxExportConfig, job: ExportJob) -> dict[str, Any]:
        return export_onnx(model_dir, out_dir, cfg, job, variant=name)

    register(
        ExportFormat(
            name=name,
            Config=config,
            run=run,
            tolerance=TOLERANCES[weights],
            description=description,
            output_format="ort" if name == "ort" else "onnx",
            libraries=LIBRARIES,
            # Taken as they are (an int8-dynamic source keeps its int8 layers); the servicer decodes others.
            source_formats=("hf-safetensors", "int8-dynamic"),
            **extra,
        )
    )


_register(
    "onnx",
    OnnxExportConfig,
    "float32",
    "ONNX (opset >= 17) with past key/values, float32, fused by ONNX Runtime's transformer optimizer; "
    "an int8-dynamic source keeps its int8 layers",
)
_register("onnx-fp16", OnnxExportConfig, "float16", "ONNX with past key/values, float16 weights and compute")
_register(
    "onnx-int8",
    Int8Config,
    "int8-dynamic",
    "ONNX with past key/values, int8 weights (output embedding included), activations quantized per call "
    "(ONNX Runtime quantize_dynamic): the fastest CPU variant",
)
_register(
    "onnx-int8-static",
    Int8StaticConfig,
    "int8-static-qdq",
    "ONNX with past key/values, int8 weights and activations in QDQ form, activation ranges calibrated "
    "on a dataset (min-max, entropy or percentile)",
    needs_calibration=True,
)
_register(
    "ort",
    OrtConfig,
    "float32",
    "ORT format for ONNX Runtime Mobile (Android, iOS), float32 or dynamic int8, with the operator list "
    "a reduced mobile build needs",
    # ONNX Runtime 1.31 writes the same graph in a different byte order on every conversion (measured:
    # three conversions of one file, at every optimization level, gave three files), so only the ONNX
    # variants are byte-reproducible; every ORT file is still verified against PyTorch.
    deterministic=False,
)
