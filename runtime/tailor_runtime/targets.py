"""The hardware targets: one catalogue that the exporter (which formats run there, with which settings) and
the roofline (`tailor_runtime.roofline`: memory, bandwidth, compute) both read. Pure Python: no torch.

A target is what a user deploys to. It may carry export defaults (the formats that run there, the default
first, and each format's settings for the hardware: Q4_0 GGUF for a Raspberry Pi, whose 8 GB at most and
no GPU make llama.cpp's 4-bit blocks the practical choice), vendor figures for the roofline, or both. Names
written by earlier versions stay as `aliases` (`raspberry-pi`, the exporter's name before the catalogue),
so a stored spec still resolves; a name that is none of them is INVALID_ARGUMENT listing the known ones.

The export defaults follow what was measured here: on x86 CPUs ONNX Runtime INT8 with its KV cache decodes
4.35x faster than PyTorch FP32 (BENCHMARKS.md). Vendor figures name their source; CPU compute is cores x
clock x FLOPs per cycle (FMA units).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tailor_runtime.errors import InvalidArgument


@dataclass(frozen=True)
class Hardware:
    """The figures a roofline estimate needs."""

    kind: str  # "cpu" or "gpu": where the weights live, which memory figure applies
    memory_bandwidth_gbs: float  # GB/s (10**9 bytes), peak
    peak_gflops: float  # dense peak for the precision decoding uses there (FP32 NEON on CPUs, FP16/BF16 tensor on GPUs)
    memory_gb: float  # RAM (CPU) or device memory (GPU), GB (10**9 bytes)
    source: str


@dataclass(frozen=True)
class Target:
    name: str
    description: str  # what the hardware is
    formats: tuple[str, ...] = ()  # the export formats that run on it, the default first; () none
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # format -> config defaults there
    formats_note: str = ""  # why those formats
    hardware: Hardware | None = None  # vendor figures for the roofline; None: no estimate
    aliases: tuple[str, ...] = ()  # names earlier versions used

    @property
    def default_format(self) -> str:
        return self.formats[0]

    @property
    def export_description(self) -> str:
        return f"{self.description}: {self.formats_note}" if self.formats_note else self.description


_CUDA_FORMATS = ("triton", "onnx-fp16", "onnx", "gguf")
_CUDA_SETTINGS: dict[str, dict[str, Any]] = {
    "triton": {"variant": "onnx-fp16", "device": "gpu"},
    "gguf": {"type": "Q8_0"},
}
_CUDA_NOTE = (
    "a Triton model repository serving the FP16 graph on GPU instances (ONNX Runtime backend), or the bare "
    "FP16 graph for ONNX Runtime's CUDA execution provider"
)
_PHONE_NOTE = (
    "the ORT format for ONNX Runtime Mobile, dynamic INT8 (in the app's assets); or an ExecuTorch program "
    "(XNNPACK, static KV cache) for ExecuTorch's LLM runner"
)

CATALOGUE: tuple[Target, ...] = (
    Target(
        "cpu-x86",
        "x86-64 servers and desktops",
        ("onnx-int8", "onnx", "onnx-int8-static", "gguf", "triton"),
        {"triton": {"variant": "onnx-int8", "device": "cpu"}},
        "ONNX Runtime with INT8 weights (dynamic activations, VNNI/AVX-512 where the CPU has them); GGUF for "
        "llama.cpp and Ollama; a Triton repository on CPU instances",
    ),
    Target(
        "cpu-arm64",
        "ARM64 servers and laptops (Graviton, Ampere, Apple silicon under Linux)",
        ("onnx-int8", "gguf", "onnx", "onnx-int8-static"),
        {"gguf": {"type": "Q4_0"}},
        "ONNX Runtime INT8 (NEON/i8mm kernels); GGUF Q4_0, which llama.cpp repacks for ARM's dot-product "
        "instructions",
    ),
    Target("cuda", "NVIDIA GPUs", _CUDA_FORMATS, _CUDA_SETTINGS, _CUDA_NOTE),
    Target("android", "Android phones", ("ort", "executorch"), {"ort": {"int8": True}}, _PHONE_NOTE),
    Target(
        "ios",
        "iPhones and iPads",
        ("ort", "coreml", "executorch"),
        {"ort": {"int8": True}},
        "the ORT format for ONNX Runtime Mobile, dynamic INT8 (the onnxruntime-objc pod); or a Core ML ML "
        "program (iOS 18, KV cache as states; converted and checked here, never run on Apple hardware), or an "
        "ExecuTorch program",
    ),
    Target(
        "raspberry-pi-5",
        "Raspberry Pi 5, 8 GB (Broadcom BCM2712, 4x Cortex-A76 at 2.4 GHz, LPDDR4X-4267, 32-bit bus)",
        ("gguf", "onnx-int8"),
        {"gguf": {"type": "Q4_0"}},
        "GGUF Q4_0 for llama.cpp, the smallest file with ARM-repacked kernels (a Pi 4's Cortex-A72 too); "
        "ONNX INT8 as the alternative",
        Hardware(
            "cpu",
            17.1,  # 4267 MT/s x 4 bytes
            153.6,  # 4 cores x 2.4 GHz x 16 FP32 FLOPs/cycle (2x 128-bit NEON FMA)
            8.0,
            "raspberrypi.com Raspberry Pi 5 product brief; Arm Cortex-A76 software optimization guide",
        ),
        aliases=("raspberry-pi",),  # the exporter's name for it before the catalogue
    ),
    Target(
        "snapdragon-8-gen-3",
        "Phone SoC: Qualcomm Snapdragon 8 Gen 3 CPU (1x X4 3.3 GHz, 5x A720, 2x A520), LPDDR5X-9600, 12 GB",
        ("ort", "executorch"),
        {"ort": {"int8": True}},
        _PHONE_NOTE,
        Hardware(
            "cpu",
            76.8,  # 9600 MT/s x 8 bytes (64-bit bus)
            380.0,  # X4: 3.3 GHz x 32 + A720: 5 x 3.0 GHz x 16 + A520: 2 x 2.3 GHz x 8 FP32 FLOPs/cycle
            12.0,
            "Qualcomm Snapdragon 8 Gen 3 product brief (LPDDR5X 4800 MHz); Arm core guides for FLOPs/cycle",
        ),
    ),
    Target(
        "t4",
        "NVIDIA T4 (16 GB GDDR6)",
        _CUDA_FORMATS,
        _CUDA_SETTINGS,
        _CUDA_NOTE,
        Hardware("gpu", 320.0, 65_000.0, 16.0, "NVIDIA T4 Tensor Core GPU datasheet"),  # FP16 tensor cores
    ),
    Target(
        "a100",
        "NVIDIA A100 SXM 80 GB (HBM2e)",
        _CUDA_FORMATS,
        _CUDA_SETTINGS,
        _CUDA_NOTE,
        Hardware("gpu", 2039.0, 312_000.0, 80.0, "NVIDIA A100 Tensor Core GPU datasheet"),  # BF16/FP16, dense
    ),
    Target(
        "h100",
        "NVIDIA H100 SXM 80 GB (HBM3)",
        _CUDA_FORMATS,
        _CUDA_SETTINGS,
        _CUDA_NOTE,
        Hardware("gpu", 3350.0, 989_000.0, 80.0, "NVIDIA H100 Tensor Core GPU datasheet"),  # BF16/FP16, dense
    ),
)

TARGETS: dict[str, Target] = {t.name: t for t in CATALOGUE}
# Every name a target answers to (its own and its aliases) -> the target.
NAMES: dict[str, Target] = {name: t for t in CATALOGUE for name in (t.name, *t.aliases)}
if len(NAMES) != sum(1 + len(t.aliases) for t in CATALOGUE):
    raise RuntimeError("a hardware target's name or alias is used twice")


def names(*, exports: bool = False, roofline: bool = False) -> list[str]:
    """The names (aliases included) of the targets with export formats and/or roofline figures."""
    return sorted(
        name
        for name, t in NAMES.items()
        if (not exports or t.formats) and (not roofline or t.hardware is not None)
    )


def get_target(
    name: str, *, exports: bool = False, roofline: bool = False, what: str = "hardware target"
) -> Target:
    """The target named `name` (or one of its aliases); `exports`/`roofline`: it must have export formats /
    roofline figures. InvalidArgument listing the names that would do."""
    target = NAMES.get(name)
    usable = names(exports=exports, roofline=roofline)
    if target is None:
        raise InvalidArgument(f"unknown {what} {name!r}", choices=usable)
    if exports and not target.formats:
        raise InvalidArgument(f"{what} {name!r} has no export formats", choices=usable)
    if roofline and target.hardware is None:
        raise InvalidArgument(
            f"{what} {name!r} has no roofline figures (memory, bandwidth, compute)", choices=usable
        )
    return target
