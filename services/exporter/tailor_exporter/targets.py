"""Named hardware targets: what a user deploys to, mapped to the export formats that run there.

An ExportRequest may name a `target` instead of (or besides) a `format`. The target picks its default
format and that format's settings for the hardware (e.g. Q4_0 GGUF for a Raspberry Pi, whose 8 GB at
most and no GPU make llama.cpp's 4-bit blocks the practical choice); the request's own config overrides
them. A format the target cannot run is INVALID_ARGUMENT naming the ones it can.

The defaults follow what was measured here: on x86 CPUs ONNX Runtime INT8 with its KV cache decodes
4.35x faster than PyTorch FP32 (BENCHMARKS.md, issue 5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tailor_runtime.errors import InvalidArgument


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    formats: tuple[str, ...]  # the formats that run on it, the default first
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # format -> config defaults

    @property
    def default_format(self) -> str:
        return self.formats[0]


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "cpu-x86",
            "x86-64 servers and desktops: ONNX Runtime with INT8 weights (dynamic activations, VNNI/AVX-512 "
            "where the CPU has them); GGUF for llama.cpp and Ollama; a Triton repository on CPU instances",
            ("onnx-int8", "onnx", "onnx-int8-static", "gguf", "triton"),
            {"triton": {"variant": "onnx-int8", "device": "cpu"}},
        ),
        Target(
            "cpu-arm64",
            "ARM64 servers and laptops (Graviton, Ampere, Apple silicon under Linux): ONNX Runtime INT8 "
            "(NEON/i8mm kernels); GGUF Q4_0, which llama.cpp repacks for ARM's dot-product instructions",
            ("onnx-int8", "gguf", "onnx", "onnx-int8-static"),
            {"gguf": {"type": "Q4_0"}},
        ),
        Target(
            "cuda",
            "NVIDIA GPUs: a Triton model repository serving the FP16 graph on GPU instances (ONNX Runtime "
            "backend), or the bare FP16 graph for ONNX Runtime's CUDA execution provider",
            ("triton", "onnx-fp16", "onnx", "gguf"),
            {"triton": {"variant": "onnx-fp16", "device": "gpu"}, "gguf": {"type": "Q8_0"}},
        ),
        Target(
            "android",
            "Android phones: the ORT format for ONNX Runtime Mobile, dynamic INT8 (in the app's assets); "
            "or an ExecuTorch program (XNNPACK, static KV cache) for ExecuTorch's LLM runner",
            ("ort", "executorch"),
            {"ort": {"int8": True}},
        ),
        Target(
            "ios",
            "iPhones and iPads: the ORT format for ONNX Runtime Mobile, dynamic INT8 (the onnxruntime-objc pod); "
            "or a Core ML ML program (iOS 18, KV cache as states; converted and checked here, never run on "
            "Apple hardware), or an ExecuTorch program",
            ("ort", "coreml", "executorch"),
            {"ort": {"int8": True}},
        ),
        Target(
            "raspberry-pi",
            "Raspberry Pi 4/5 (Cortex-A72/A76, 1-8 GB, no GPU): GGUF Q4_0 for llama.cpp, the smallest file "
            "with ARM-repacked kernels; ONNX INT8 as the alternative",
            ("gguf", "onnx-int8"),
            {"gguf": {"type": "Q4_0"}},
        ),
    )
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise InvalidArgument(f"unknown export target {name!r}", choices=sorted(TARGETS))
    return TARGETS[name]


def resolve(format_name: str, target_name: str, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(format, config) of a request: a target fills in its default format and that format's settings
    for the hardware; what the request says itself wins."""
    if not target_name:
        if not format_name:
            raise InvalidArgument("an export needs a format or a target", choices=sorted(TARGETS))
        return format_name, config
    target = get_target(target_name)
    chosen = format_name or target.default_format
    if chosen not in target.formats:
        raise InvalidArgument(
            f"format {chosen!r} does not run on target {target.name!r}; it runs "
            + ", ".join(target.formats)
            + f" (default {target.default_format}). Leave the format out to get the default"
        )
    return chosen, {**target.settings.get(chosen, {}), **config}
