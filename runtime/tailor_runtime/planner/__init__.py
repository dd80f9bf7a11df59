"""The memory and time planner: what each stage of a pipeline needs, from the model's config.json.

`plan_stage` predicts one stage's peak accelerator memory, peak host memory, disk written and a rough
time on one machine (a worker's `HardwareProfile`); `fits` says whether it fits there and `alternatives`
what would (QLoRA instead of LoRA, gradient checkpointing, a smaller batch or sequence, a weight-only
method). No torch: the gateway plans every submission with it. Formulas and their checks against
measured peaks: docs/planning.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tailor_runtime.planner.shape import ModelShape
from tailor_runtime.planner.stages import (
    GIB,
    Estimate,
    Machine,
    output_bytes,
    plan_benchmark,
    plan_export,
    plan_finetune,
    plan_quantize,
)

__all__ = [
    "GIB",
    "Estimate",
    "Machine",
    "ModelShape",
    "alternatives",
    "fits",
    "plan_pipeline",
    "plan_stage",
]
# Stage kind -> the worker pool that runs it.
POOL_OF = {"finetune": "trainer", "quantize": "quantizer", "benchmark": "benchmarker", "export": "exporter"}


def plan_stage(
    shape: ModelShape,
    kind: str,
    params: Mapping[str, Any],
    machine: Machine,
    in_bytes: int | None = None,
    benchmark_config: Mapping[str, Any] | None = None,
) -> Estimate | None:
    """One stage of `tailor_gateway.spec.plan` (kind and params as it builds them); None for the stages
    that hold no model (select, report, import)."""
    if kind == "finetune":
        est = plan_finetune(shape, params.get("method", "lora"), params.get("config"), machine)
    elif kind == "quantize":
        calibration = params.get("calibration") or {}
        est = plan_quantize(shape, params["method"], params.get("config"), calibration, machine, in_bytes)
    elif kind == "benchmark":
        candidate = params.get("method") or params.get("candidate", "original")
        reference = params.get("candidate") not in ("original", "base")
        est = plan_benchmark(shape, candidate, benchmark_config, machine, in_bytes, reference)
    elif kind == "export":
        est = plan_export(shape, params.get("format") or "onnx", machine, in_bytes)
    else:
        return None
    return est


def fits(est: Estimate, machine: Machine) -> tuple[bool, str]:
    """(fits, why not) on one machine: the GPU's memory (one GPU; multi-GPU sharding is not modelled) and
    the host's RAM."""
    problems = []
    # Several GPUs: the peak split evenly, as FSDP or a device map would (what a stage could reach; the
    # stages themselves run on one GPU today, issue 18 item 3).
    per_gpu = est.accelerator_bytes / max(1, machine.gpus)
    if est.accelerator_bytes and machine.on_gpu and per_gpu > machine.accelerator_memory_gb * GIB:
        gpus = f" on each of {machine.gpus} GPUs (split evenly)" if machine.gpus > 1 else " on the GPU"
        problems.append(
            f"needs {per_gpu / GIB:.1f} GiB{gpus}, {machine.accelerator or 'the GPU'} has "
            f"{machine.accelerator_memory_gb:.1f} GiB"
        )
    if machine.memory_gb and est.host_bytes > machine.memory_gb * GIB:
        problems.append(
            f"needs {est.gib('host'):.1f} GiB of host memory, the worker has {machine.memory_gb:.1f} GiB"
        )
    return not problems, "; ".join(problems)


def _finetune_variants(params: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    method, config = params.get("method", "lora"), dict(params.get("config") or {})
    batch, seq = int(config.get("batch_size", 8)), int(config.get("seq_len", 128))
    out: list[tuple[str, dict[str, Any]]] = []
    if method in ("lora", "dora") and not config.get("quantize_base"):
        out.append(("method: qlora", {**params, "method": "qlora"}))
    if not config.get("gradient_checkpointing"):
        out.append(
            ("gradient_checkpointing: true", {**params, "config": {**config, "gradient_checkpointing": True}})
        )
    for b in (batch // 2, batch // 4, 1):
        if 1 <= b < batch:
            out.append((f"batch_size: {b}", {**params, "config": {**config, "batch_size": b}}))
    for s in (seq // 2, seq // 4):
        if s >= 16:
            out.append((f"seq_len: {s}", {**params, "config": {**config, "seq_len": s}}))
    if method in ("lora", "dora"):
        both = {**config, "gradient_checkpointing": True, "batch_size": 1}
        out.append(("method: qlora, gradient_checkpointing: true, batch_size: 1",
                    {**params, "method": "qlora", "config": both}))  # fmt: skip
    return out


def alternatives(
    shape: ModelShape, kind: str, params: Mapping[str, Any], machine: Machine, **kw: Any
) -> list[tuple[str, Estimate]]:
    """Changes to the stage that fit `machine`, each with its estimate (the lowest-memory first)."""
    variants: list[tuple[str, Mapping[str, Any]]] = []
    if kind == "finetune":
        variants = _finetune_variants(params)
    elif kind == "quantize":
        if params.get("method") in ("gptq", "awq", "smoothquant", "int8_static"):
            variants.append(("method: rtn (weight-only, no calibration)", {**params, "method": "rtn"}))
            cal = dict(params.get("calibration") or {})
            variants.append(("calibration.samples: 32", {**params, "calibration": {**cal, "samples": 32}}))
        variants.append(
            ("method: gguf_q4_k_m (streams tensor by tensor)", {**params, "method": "gguf_q4_k_m"})
        )
    elif kind == "benchmark":
        bench = dict(kw.get("benchmark_config") or {})
        kw = {**kw, "benchmark_config": {**bench, "context_length": 128, "batch_sizes": [1]}}
        variants.append(("benchmark.config: context_length 128, batch_sizes [1]", params))
    found = []
    for label, variant in variants:
        est = plan_stage(shape, kind, variant, machine, **kw)
        if est is not None and fits(est, machine)[0]:
            found.append((label, est))
    return sorted(found, key=lambda f: f[1].accelerator_bytes + f[1].host_bytes)


def plan_pipeline(
    config: Mapping[str, Any],
    stages: list[tuple[str, str, Mapping[str, Any]]],
    machines: Mapping[str, list[Machine]],
    benchmark_config: Mapping[str, Any] | None = None,
) -> list[tuple[str, str, Mapping[str, Any], list[tuple[Machine | None, Estimate]]]]:
    """Every (name, kind, params) stage planned on each machine of its pool (`machines`: pool -> the
    distinct hardware its workers report; a pool without any is planned on an unknown machine, CPU
    assumed). The input width flows along the DAG: a merged fine-tune is float32 (save_hf_model), a
    candidate's benchmark reads the quantize stage's output."""
    shape = ModelShape.from_config(config)
    width = {"": shape.dtype_bytes}
    quantized: dict[str, str] = {}
    results = []
    for name, kind, params in stages:
        if kind == "finetune":
            width["finetuned"] = 4
        in_bytes = width["finetuned"] if "finetuned" in width and name != "benchmark/base" else width[""]
        if kind == "quantize":
            quantized[params.get("candidate") or params["method"]] = params["method"]
        if kind == "benchmark":
            candidate = params.get("candidate", "original")
            params = {**params, "method": quantized.get(candidate, "original")}
        plans = []
        for machine in machines.get(POOL_OF.get(kind, ""), []) or [None]:
            est = plan_stage(shape, kind, params, machine or Machine(), in_bytes, benchmark_config)
            if est is None:
                break
            est = replace(est, stage=name)
            plans.append((machine, est))
        if plans:
            results.append((name, kind, params, plans))
    return results


__all__ += ["output_bytes", "POOL_OF"]
