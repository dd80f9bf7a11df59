"""llm-compressor methods: RTN, weight-only INT8, GPTQ, AWQ, SmoothQuant (W8A8) and FP8.

Each writes a `compressed-tensors` folder (what vLLM serves; transformers loads it too). All library
calls go through `tailor_quantizer.llm_compressor`; this module only declares the methods, their options
and what they record. Every method checks the architecture and the group size before any calibration
runs, so a bad request fails in seconds with what would work.

Bits: integer weights pack 2..8 bits per weight into int32 words. 3-bit GPTQ saves and loads with
compressed-tensors 0.19 (tested), but vLLM's fast kernels take 4- and 8-bit weights only, so a 3-bit
model runs through transformers' dequantizing path, not vLLM.

Measured on stories260K (bench/quantize_methods.py; perplexity on 32768 held-out tokens, float 3.820):
GPTQ beats round-to-nearest at the same bits and group size (4-bit per channel 4.18 vs 4.38, group 4
3.98 vs 4.07). AWQ beats it with symmetric per-channel scales (4.32 vs 4.38) but not
with zero points, where RTN is already better on this tiny model (per channel 4.24 vs 4.19, group 4
3.90 vs 3.87): its activation outliers, which AWQ exists for, are mild, and with grouped-query attention
the v_proj -> o_proj mapping is skipped. SmoothQuant W8A8 and weight-only INT8 stay within 0.1%.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool

from tailor_quantizer.methods.registry import Caps, QuantizeJob, register

GROUP_SIZE_HELP = (
    "Weights per scale along each row: a positive divisor of every layer's input width (128 is usual), "
    "or -1 for one scale per output channel."
)


def llm_compressor_availability() -> tuple[bool, str]:
    from tailor_quantizer import llm_compressor

    return llm_compressor.availability()


def _check_group_size(value: int) -> int:
    if value != -1 and value < 1:
        raise ValueError("group_size must be a positive number of weights, or -1 for per output channel")
    return value


GroupSize = Annotated[int, AfterValidator(_check_group_size)]


def compressed_caps(bits: tuple[int, ...], calibration: bool, description: str, **extra: Any) -> Caps:
    from tailor_quantizer.llm_compressor import LIBRARIES

    return Caps(
        bits=bits,
        needs_calibration=calibration,
        devices=("cpu", "cuda"),
        output_format="compressed-tensors",
        libraries=LIBRARIES,
        description=description,
        **extra,
    )


def _weights_only(
    model_dir: Path,
    out_dir: Path,
    job: QuantizeJob,
    method: str,
    recipe_of,
    bits: int,
    group_size: int,
    symmetric: bool,
    calibration: Any = None,
) -> dict[str, Any]:
    """Shared by rtn, int8_weight_only and gptq: integer weights, activations left in float.
    `calibration` only for GPTQ: round-to-nearest needs no data, so it runs none through the model."""
    from tailor_quantizer import llm_compressor as lc

    model, tokenizer, layers = lc.load(model_dir, method, job)
    lc.check_group_size(layers, group_size, method)
    groups = [lc.Group(targets=["Linear"], weights=lc.int_weights(bits, group_size, symmetric))]
    job.progress(10.0, "quantizing", f"{method}: {lc.scheme_name(bits)}, group size {group_size}")
    lc.oneshot(model, recipe_of(groups), job, calibration)
    job.progress(90.0, "saving", "packing and writing safetensors")
    metrics = lc.save(
        model,
        tokenizer,
        out_dir,
        method=method,
        scheme=lc.scheme_name(bits),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )
    job.progress(100.0, "saving", "saved")
    return metrics


class RtnConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[4, 8] = Field(default=4, description="Bits per weight: 4 or 8.")
    group_size: GroupSize = Field(default=128, description=GROUP_SIZE_HELP)
    symmetric: StrictBool = Field(
        default=True, description="Scales only (zero maps to zero); false adds a zero point per group."
    )


@register(
    "rtn",
    caps=compressed_caps(
        (4, 8),
        False,
        "Round-to-nearest integer weights (llm-compressor QuantizationModifier): a scale per group from "
        "the weights' min/max, no calibration. The baseline GPTQ and AWQ must beat. Activations, "
        "embeddings and lm_head stay float.",
    ),
)
class Rtn:
    Config = RtnConfig
    availability = staticmethod(llm_compressor_availability)

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: RtnConfig, job: QuantizeJob) -> dict[str, Any]:
        from tailor_quantizer import llm_compressor as lc

        return _weights_only(model_dir, out_dir, job, "rtn", lc.rtn, cfg.bits, cfg.group_size, cfg.symmetric)


@register(
    "int8_weight_only",
    caps=compressed_caps(
        (8,),
        False,
        "Weight-only INT8 (W8A16): int8 weights with a scale per output channel (or group), rounded to "
        "nearest; activations stay float. Nearly lossless, half the bf16 size; vLLM serves it.",
    ),
)
class Int8WeightOnly:
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        group_size: GroupSize = Field(default=-1, description=GROUP_SIZE_HELP)
        symmetric: StrictBool = Field(
            default=True, description="Scales only (zero maps to zero); false adds a zero point per group."
        )

    availability = staticmethod(llm_compressor_availability)

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: Config, job: QuantizeJob) -> dict[str, Any]:
        from tailor_quantizer import llm_compressor as lc

        return _weights_only(
            model_dir, out_dir, job, "int8_weight_only", lc.rtn, 8, cfg.group_size, cfg.symmetric
        )


ACTORDER_HELP = (
    "Column order GPTQ quantizes in: 'static' (by calibration activation size, then stored in the "
    "normal order: better accuracy at no run-time cost) or 'none'. compressed-tensors 0.19 removed "
    "'group' (dynamic) ordering."
)


@register(
    "gptq",
    caps=compressed_caps(
        (3, 4, 8),
        True,
        "GPTQ (llm-compressor GPTQModifier): integer weights quantized column by column, correcting the "
        "remaining columns with the calibration inputs' inverse Hessian, one decoder layer at a time. "
        "3-bit saves and loads, but vLLM's kernels serve 4 and 8 bits only.",
    ),
)
class Gptq:
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        bits: Literal[3, 4, 8] = Field(default=4, description="Bits per weight: 3, 4 or 8.")
        group_size: GroupSize = Field(default=128, description=GROUP_SIZE_HELP)
        symmetric: StrictBool = Field(
            default=True, description="Scales only (zero maps to zero); false adds a zero point per group."
        )
        actorder: Literal["static", "none"] = Field(default="static", description=ACTORDER_HELP)
        dampening_frac: float = Field(
            default=0.01,
            gt=0,
            le=1,
            description="Added to the Hessian's diagonal, as a fraction of its mean, for a stable inverse.",
        )

    availability = staticmethod(llm_compressor_availability)

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: Config, job: QuantizeJob) -> dict[str, Any]:
        from tailor_quantizer import llm_compressor as lc

        _require_calibration(job, "gptq")

        def recipe(groups):
            return lc.gptq(groups, cfg.dampening_frac, cfg.actorder)

        return _weights_only(
            model_dir, out_dir, job, "gptq", recipe, cfg.bits, cfg.group_size, cfg.symmetric, job.calibration
        )


@register(
    "awq",
    caps=compressed_caps(
        (4,),
        True,
        "AWQ (activation-aware weight quantization, llm-compressor AWQModifier): scales the input "
        "channels that carry large calibration activations before rounding 4-bit weights to nearest. "
        "Needs llm-compressor's layer mapping for the architecture (Llama, Mistral, Qwen, Gemma, Phi-3, "
        "...); with grouped-query attention the v_proj -> o_proj pair is skipped (shapes differ).",
    ),
)
class Awq:
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        group_size: GroupSize = Field(default=128, description=GROUP_SIZE_HELP)
        symmetric: StrictBool = Field(
            default=False,
            description="AWQ's usual format has a zero point per group (false); true stores scales only.",
        )
        n_grid: int = Field(
            default=20, ge=2, le=100, description="Scale exponents tried per layer mapping (grid search)."
        )
        duo_scaling: StrictBool = Field(
            default=True, description="Search scales from activations and weights (true) or activations only."
        )

    availability = staticmethod(llm_compressor_availability)

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: Config, job: QuantizeJob) -> dict[str, Any]:
        from tailor_quantizer import llm_compressor as lc

        _require_calibration(job, "awq")
        model, tokenizer, layers = lc.load(model_dir, "awq", job, needs_mappings="awq")
        lc.check_group_size(layers, cfg.group_size, "awq")
        groups = [lc.Group(targets=["Linear"], weights=lc.int_weights(4, cfg.group_size, cfg.symmetric))]
        job.progress(10.0, "quantizing", f"awq: W4A16, group size {cfg.group_size}")
        lc.oneshot(model, lc.awq(groups, cfg.n_grid, cfg.duo_scaling), job, job.calibration)
        job.progress(90.0, "saving", "packing and writing safetensors")
        metrics = lc.save(
            model,
            tokenizer,
            out_dir,
            method="awq",
            scheme=lc.scheme_name(4),
            bits=4,
            group_size=cfg.group_size,
            symmetric=cfg.symmetric,
        )
        job.progress(100.0, "saving", "saved")
        return metrics


@register(
    "smoothquant",
    caps=compressed_caps(
        (8,),
        True,
        "SmoothQuant + W8A8 (llm-compressor SmoothQuantModifier): migrates activation outliers into the "
        "weights, then int8 weights (per output channel, GPTQ or round-to-nearest) and int8 activations "
        "(per token at run time, or one static scale per layer from calibration). vLLM runs the int8 "
        "matmuls on GPUs; on CPU transformers simulates them.",
    ),
)
class SmoothQuant:
    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        smoothing_strength: float = Field(
            default=0.8,
            ge=0,
            le=1,
            description="Alpha: how much of the activation range moves into the weights (0 none, 1 all).",
        )
        weights: Literal["gptq", "rtn"] = Field(
            default="gptq", description="How the int8 weights are rounded after smoothing."
        )
        activations: Literal["dynamic", "static"] = Field(
            default="dynamic",
            description="int8 activation scales per token at run time (dynamic) or one per layer from "
            "calibration (static: faster, less accurate).",
        )

    availability = staticmethod(llm_compressor_availability)

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: Config, job: QuantizeJob) -> dict[str, Any]:
        from tailor_quantizer import llm_compressor as lc

        _require_calibration(job, "smoothquant")
        model, tokenizer, _ = lc.load(model_dir, "smoothquant", job, needs_mappings="smoothquant")
        weights = lc.int_weights(8, -1, True)
        if cfg.activations == "dynamic":
            acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
        else:
            acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
        groups = [lc.Group(targets=["Linear"], weights=weights, input_activations=acts)]
        job.progress(10.0, "quantizing", f"smoothquant {cfg.smoothing_strength} + W8A8 ({cfg.weights})")
        recipe = lc.smoothquant(groups, cfg.smoothing_strength, cfg.weights, 0.01, "static")
        lc.oneshot(model, recipe, job, job.calibration)
        job.progress(90.0, "saving", "writing safetensors")
        metrics = lc.save(
            model,
            tokenizer,
            out_dir,
            method="smoothquant",
            scheme=lc.scheme_name(8, 8),
            bits=8,
            activations=cfg.activations,
            smoothing_strength=cfg.smoothing_strength,
            weights=cfg.weights,
        )
        job.progress(100.0, "saving", "saved")
        return metrics


@register(
    "fp8",
    caps=compressed_caps(
        (8,),
        False,
        "FP8 E4M3 weights (a scale per output channel) and activations (cast per token at run time), "
        "llm-compressor's FP8_DYNAMIC scheme: no calibration, about bf16 quality at half the size. Needs "
        "an FP8 GPU (compute capability 8.9: Ada, Hopper) to run fast in vLLM.",
        min_compute_capability="8.9",
    ),
)
class Fp8:
    class Config(BaseModel):
        """No options: per-channel weight scales and per-token activation scales are fully determined."""

        model_config = ConfigDict(extra="forbid", frozen=True)

    @staticmethod
    def availability() -> tuple[bool, str]:
        from tailor_quantizer.methods.registry import cuda_at_least

        ok, why = llm_compressor_availability()
        if not ok:
            return ok, why
        return cuda_at_least("8.9")

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: Config, job: QuantizeJob) -> dict[str, Any]:
        from tailor_quantizer import llm_compressor as lc

        model, tokenizer, _ = lc.load(model_dir, "fp8", job)
        job.progress(10.0, "quantizing", "fp8: FP8_DYNAMIC")
        lc.oneshot(model, lc.fp8_dynamic(), job)
        job.progress(90.0, "saving", "writing safetensors")
        metrics = lc.save(model, tokenizer, out_dir, method="fp8", scheme="FP8_DYNAMIC", bits=8)
        job.progress(100.0, "saving", "saved")
        return metrics


def _require_calibration(job: QuantizeJob, method: str) -> None:
    from tailor_runtime.errors import InvalidArgument

    if job.calibration is None:
        raise InvalidArgument(f"{method} needs calibration data (calibration_data in the request)")
