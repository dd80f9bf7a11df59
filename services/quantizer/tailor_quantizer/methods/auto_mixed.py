"""auto: mixed precision chosen per layer to fit a size budget, written as one compressed-tensors model.

1. Sensitivity. For each unit and each candidate bit width, only that unit's weights are rounded to
   nearest and the model runs on calibration tokens; the unit's sensitivity at that width is the mean
   KL(float || quantized) of the next-token distributions (one forward pass per unit and width, on
   `sensitivity_samples` sequences). A unit is one Linear layer, or with granularity "fused" (the
   default) the layers vLLM runs as one matmul, q/k/v and gate/up, which vLLM needs in one scheme.
2. Choice. Every unit starts at its smallest width; upgrades are then bought greedily, best
   sensitivity saved per extra byte first, while the total stays within `max_size_fraction` of the
   bf16 size of the quantized layers (sizes are the bytes compressed-tensors stores: packed weights,
   scales, zero points). The greedy choice is kept only if its summed sensitivity beats every uniform
   width that also fits (it nearly always does); otherwise that uniform choice is used.
3. Quantization. One GPTQ (or RTN) run with a config group per chosen width, whose targets list the
   layers by name: one compressed-tensors folder. transformers loads any; vLLM serves it when the
   widths are 4 and 8 (its kernels) and the granularity is "fused".

Sensitivities add up only approximately (layers interact), so the quality claim is measured, not
assumed (tests/test_compressed_methods.py, bench/quantize_methods.py). On stories260K, whose layers are
about equally sensitive per byte, the gain over uniform quantization of the same size is small and not
universal (perplexity on 32768 tokens of TinyStories validation text, float 3.820): at the size of
uniform 5-bit, per-layer widths from {3,4,5,6,8} give 3.949 against 3.991 with RTN and 3.907 against
3.917 with GPTQ; at the size of uniform 4-bit (fused units) auto is worse, 4.410 against 4.378, because
isolated sensitivities underestimate how 3-bit layers compound. What auto always gives is sizes between
the uniform widths: the default (4- and 8-bit layers, 0.30 of bf16, GPTQ) reaches 4.109 at 301 KiB,
between uniform 4-bit GPTQ (4.182, 288 KiB) and 8-bit (3.824, 398 KiB).

Memory: the sensitivity pass holds the whole model on the job's device (16 GiB peak for a bf16
Llama-2-7B on an H100, bench/results_quantize_7b_h100.json); the quantization itself then runs one
decoder layer at a time like the other llm-compressor methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from tailor_quantizer.methods.compressed import (
    GROUP_SIZE_HELP,
    GroupSize,
    compressed_caps,
    llm_compressor_availability,
)
from tailor_quantizer.methods.registry import QuantizeJob, register

BF16_BYTES = 2


class AutoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_size_fraction: float = Field(
        default=0.30,
        gt=0,
        le=1,
        description="Size budget: the quantized layers may take at most this fraction of their bf16 size "
        "(0.30 leaves room for a few 8-bit layers among 4-bit ones).",
    )
    candidate_bits: tuple[Literal[2, 3, 4, 5, 6, 7, 8], ...] = Field(
        default=(4, 8),
        min_length=1,
        description="Bit widths a layer may get. vLLM's kernels serve 4 and 8; 2, 3 and 5-7 load in "
        "transformers only.",
    )
    algorithm: Literal["gptq", "rtn"] = Field(
        default="gptq", description="How the chosen widths are applied: GPTQ (better) or round-to-nearest."
    )
    group_size: GroupSize = Field(default=128, description=GROUP_SIZE_HELP)
    symmetric: StrictBool = Field(
        default=True, description="Scales only (zero maps to zero); false adds a zero point per group."
    )
    granularity: Literal["fused", "layer"] = Field(
        default="fused",
        description="'fused': q/k/v and gate/up share a width, as vLLM needs (it runs each set as one "
        "matmul); 'layer': every Linear chooses alone (finer, but only transformers loads the result).",
    )
    sensitivity_samples: int = Field(
        default=16,
        ge=1,
        le=512,
        description="Calibration sequences each sensitivity measurement runs (one forward pass per "
        "layer and width).",
    )

    @field_validator("candidate_bits")
    @classmethod
    def _sorted_unique(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(value)))


@register(
    "auto",
    caps=compressed_caps(
        (2, 3, 4, 5, 6, 7, 8),
        True,
        "Automatic mixed precision: measures each layer's sensitivity (KL divergence of the output when "
        "only that layer is quantized) at each candidate width, picks widths per layer to fit a size "
        "budget with the least total sensitivity, and writes one compressed-tensors model (GPTQ or RTN) "
        "with a config group per width. Records the chosen bits and sensitivities.",
    ),
)
class AutoMixed:
    Config = AutoConfig
    availability = staticmethod(llm_compressor_availability)

    @staticmethod
    def run(model_dir: Path, out_dir: Path, cfg: AutoConfig, job: QuantizeJob) -> dict[str, Any]:
        from tailor_quantizer import llm_compressor as lc
        from tailor_runtime.errors import InvalidArgument

        if job.calibration is None:
            raise InvalidArgument("auto needs calibration data (calibration_data in the request)")
        model, tokenizer, layers = lc.load(model_dir, "auto", job)
        lc.check_group_size(layers, cfg.group_size, "auto")
        units: dict[str, list[str]] = {}
        for name in layers:
            units.setdefault(lc.fused_unit(name) if cfg.granularity == "fused" else name, []).append(name)
        args = {b: lc.int_weights(b, cfg.group_size, cfg.symmetric) for b in cfg.candidate_bits}
        cost = {
            u: {b: sum(lc.stored_bytes(layers[n], args[b]) for n in names) for b in args}
            for u, names in units.items()
        }
        bf16 = sum(layers[n].weight.numel() * BF16_BYTES for n in layers)
        budget = cfg.max_size_fraction * bf16
        smallest = min(cfg.candidate_bits)
        floor = sum(c[smallest] for c in cost.values())
        if floor > budget:
            raise InvalidArgument(
                f"auto: max_size_fraction {cfg.max_size_fraction} is below what the smallest candidate "
                f"({smallest} bits, group size {cfg.group_size}) takes: {floor / bf16:.3f} of the bf16 size"
            )

        sensitivity = measure_sensitivity(model, units, layers, args, job, cfg.sensitivity_samples)
        choice = choose_bits(sensitivity, cost, budget)
        layer_bits = {n: choice[u] for u, names in units.items() for n in names}
        size = sum(cost[u][b] for u, b in choice.items())

        groups = [
            lc.Group(targets=sorted(n for n in layer_bits if layer_bits[n] == b), weights=args[b])
            for b in sorted(set(layer_bits.values()))
        ]
        widths = ", ".join(
            f"{sum(v == b for v in layer_bits.values())} layers at {b} bits"
            for b in sorted(set(layer_bits.values()))
        )
        job.progress(40.0, "quantizing", f"auto ({cfg.algorithm}): {widths}")
        if cfg.algorithm == "gptq":
            lc.oneshot(model, lc.gptq(groups, 0.01, "static"), job, job.calibration)
        else:
            lc.oneshot(model, lc.rtn(groups), job)
        job.progress(90.0, "saving", "packing and writing safetensors")
        weights_total = sum(layers[n].weight.numel() for n in layers)
        mean_bits = sum(layer_bits[n] * layers[n].weight.numel() for n in layers) / weights_total
        stats = {
            "layer_bits": layer_bits,
            "sensitivity_kl": {u: {str(b): s for b, s in row.items()} for u, row in sensitivity.items()},
            "size_fraction_of_bf16": size / bf16,
            "max_size_fraction": cfg.max_size_fraction,
            "mean_weight_bits": mean_bits,
            "chosen_sensitivity_kl": sum(sensitivity[u][b] for u, b in choice.items()),
        }
        metrics = lc.save(
            model,
            tokenizer,
            out_dir,
            method="auto",
            scheme="mixed",
            algorithm=cfg.algorithm,
            group_size=cfg.group_size,
            symmetric=cfg.symmetric,
            layer_bits=layer_bits,
        )
        job.stats.update(stats)
        job.progress(100.0, "saving", "saved")
        return {**metrics, **stats}


def measure_sensitivity(
    model: Any,
    units: dict[str, list[str]],
    layers: dict[str, Any],
    args: dict[int, dict],
    job: QuantizeJob,
    samples: int,
) -> dict[str, dict[int, float]]:
    """{unit: {bits: mean KL(float || unit alone quantized at bits)}} on `samples` calibration sequences."""
    import torch

    from tailor_quantizer import llm_compressor as lc

    device = job.device
    ids = job.calibration.as_tensor()[:samples]
    per_batch = max(1, lc.BATCH_TOKENS // ids.shape[1])
    batches = [ids[i : i + per_batch].to(device) for i in range(0, len(ids), per_batch)]
    model.to(device)

    def log_probs() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [model(input_ids=b, use_cache=False).logits.float().log_softmax(-1) for b in batches]

    reference = log_probs()
    result: dict[str, dict[int, float]] = {}
    try:
        for i, (unit, names) in enumerate(units.items()):
            job.progress(5.0 + 35.0 * i / len(units), "sensitivity", unit)
            result[unit] = {}
            for bits, weight_args in args.items():
                originals = {n: layers[n].weight.data for n in names}
                for n in names:
                    layers[n].weight.data = lc.fake_quantize_weight(originals[n], weight_args)
                try:
                    kl = sum(
                        torch.nn.functional.kl_div(q, r, log_target=True, reduction="sum").item()
                        for q, r in zip(log_probs(), reference, strict=True)
                    )
                finally:
                    for n in names:
                        layers[n].weight.data = originals[n]
                result[unit][bits] = kl / ids.numel()  # mean KL per token
    finally:
        model.to("cpu")  # llm-compressor moves layers to the GPU itself, one at a time
    return result


def choose_bits(
    sensitivity: dict[str, dict[int, float]], cost: dict[str, dict[int, int]], budget: float
) -> dict[str, int]:
    """Bits per unit with total cost <= budget and (approximately) least summed sensitivity: greedy
    upgrades by sensitivity saved per extra byte, then the best uniform width if that sums lower."""
    choice = {u: min(row) for u, row in cost.items()}
    spent = sum(cost[u][b] for u, b in choice.items())
    while True:
        best = None  # (saved per byte, unit, bits, extra bytes)
        for unit, current in choice.items():
            for bits in cost[unit]:
                extra = cost[unit][bits] - cost[unit][current]
                if bits <= current or spent + extra > budget:
                    continue
                saved = sensitivity[unit][current] - sensitivity[unit][bits]
                candidate = (saved / extra, unit, bits, extra)
                if best is None or candidate[:2] > best[:2]:
                    best = candidate
        if best is None or best[0] <= 0:
            break
        _, unit, bits, extra = best
        choice[unit], spent = bits, spent + extra

    def total(c: dict[str, int]) -> float:
        return sum(sensitivity[u][b] for u, b in c.items())

    for bits in next(iter(cost.values())):
        uniform = {u: bits for u in cost}
        if sum(cost[u][bits] for u in cost) <= budget and total(uniform) < total(choice):
            choice = uniform
    return choice
