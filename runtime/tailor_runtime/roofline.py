"""Roofline estimates of decode speed and memory on named target hardware. Pure Python: no torch.

Greedy decoding at batch `b` reads every weight once per step and does about 2 FLOPs per parameter per
sequence, so one step takes at least max(weight bytes / memory bandwidth, b * 2 * parameters / peak
FLOP/s). At batch 1 every profile here is bandwidth-bound (an LLM does ~2-4 FLOPs per weight byte; the
hardware offers 10-300 FLOPs per byte of bandwidth). The estimate is an upper bound on speed: kernels
reach a share of peak bandwidth, and very small models are dominated by framework overhead per token,
which a roofline does not see (stories260K decodes ~20x slower than its roofline; a ~100M model within
about 2x: see `tests/unit/test_roofline.py` and BENCHMARKS.md). KV-cache reads are ignored (short
contexts). Every figure this module returns is labelled `"estimate"`.

The targets and their vendor figures are the hardware-target catalogue's (`tailor_runtime.targets`), which
the exporter's targets read too.

Memory on a target: on a CPU profile, the peak resident memory measured here (the same software stack
runs there); on an accelerator, the weights plus ACCELERATOR_MEMORY_MARGIN for activations, the KV cache
and the allocator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tailor_runtime.errors import InvalidArgument
from tailor_runtime.targets import TARGETS, Target, get_target

ACCELERATOR_MEMORY_MARGIN = 0.2
LABEL = "estimate (roofline upper bound)"


@dataclass(frozen=True)
class HardwareProfile:
    """A target's roofline figures under its name (not the proto's `common.HardwareProfile`, which is the
    machine a worker runs on)."""

    name: str
    description: str
    kind: str  # "cpu" or "gpu": where the weights live, which memory figure applies
    memory_bandwidth_gbs: float  # GB/s (10**9 bytes), peak
    peak_gflops: float  # dense peak for the precision decoding uses there (FP32 NEON on CPUs, FP16/BF16 tensor on GPUs)
    memory_gb: float  # RAM (CPU) or device memory (GPU), GB (10**9 bytes)
    source: str


def _profile(target: Target) -> HardwareProfile:
    hw = target.hardware
    if hw is None:
        raise ValueError(f"target {target.name!r} has no roofline figures")
    return HardwareProfile(
        target.name,
        target.description,
        hw.kind,
        hw.memory_bandwidth_gbs,
        hw.peak_gflops,
        hw.memory_gb,
        hw.source,
    )


# The targets of the catalogue (`tailor_runtime.targets`) that carry vendor figures, by their names.
PROFILES: dict[str, HardwareProfile] = {
    t.name: _profile(t) for t in TARGETS.values() if t.hardware is not None
}


def get_profile(name: str) -> HardwareProfile:
    """The roofline profile of the target named `name` (an alias too: `raspberry-pi`); InvalidArgument
    listing the targets that have figures."""
    return PROFILES[get_target(name, roofline=True).name]


def decode_estimate(
    profile: HardwareProfile, weight_bytes: float, parameters: float | None = None, batch: int = 1
) -> dict[str, float | str]:
    """Roofline decode speed of a model with `weight_bytes` of weights (and `parameters`) on `profile`.

    Without `parameters`, one parameter per weight byte is assumed for the compute bound (int8; an
    fp32 model has fewer parameters per byte, so the compute bound is then generous, which changes
    nothing at batch 1, where the bandwidth bound is the binding one).
    """
    if weight_bytes <= 0 or batch < 1:
        raise InvalidArgument(f"need weight_bytes > 0 and batch >= 1, got {weight_bytes} and {batch}")
    params = parameters if parameters is not None else weight_bytes
    memory_s = weight_bytes / (profile.memory_bandwidth_gbs * 1e9)
    compute_s = batch * 2 * params / (profile.peak_gflops * 1e9)
    step_s = max(memory_s, compute_s)
    return {
        "profile": profile.name,
        "tokens_per_s": batch / step_s,
        "ms_per_token": 1000 * step_s,
        "bound": "memory bandwidth" if memory_s >= compute_s else "compute",
        "batch": batch,
        "label": LABEL,
    }


def estimate_for_target(profile: HardwareProfile, metrics: dict[str, float]) -> dict[str, float]:
    """Benchmark headline metrics (model_memory_mb, peak_memory_mb, latency percentiles) on `profile`.

    Returns `est_tokens_per_s`, `est_latency_ms_per_token`, `est_latency_p95_ms` (the roofline time
    scaled by the p95/median ratio measured here), `est_memory_mb` and `est_fits` (1.0 or 0.0).
    """
    weight_mb = metrics.get("model_memory_mb") or metrics.get("size_mb")
    if not weight_mb or not math.isfinite(weight_mb):
        raise InvalidArgument("a roofline estimate needs model_memory_mb or size_mb")
    est = decode_estimate(profile, weight_mb * 2**20)
    ms = float(est["ms_per_token"])
    median, p95 = metrics.get("latency_ms_per_token"), metrics.get("latency_p95_ms")
    spread = p95 / median if median and p95 and median > 0 else 1.0
    # A CPU target runs the same software stack: the process's peak RSS measured here applies (a model
    # measured on a GPU reports that too, as peak_rss_mb).
    rss_mb = metrics.get("peak_rss_mb") or metrics.get("peak_memory_mb")
    if profile.kind == "cpu" and rss_mb:
        memory_mb = rss_mb
    else:
        memory_mb = weight_mb * (1 + ACCELERATOR_MEMORY_MARGIN)
    return {
        "est_tokens_per_s": float(est["tokens_per_s"]),
        "est_latency_ms_per_token": ms,
        "est_latency_p95_ms": ms * spread,
        "est_memory_mb": memory_mb,
        "est_fits": 1.0 if memory_mb * 2**20 <= profile.memory_gb * 1e9 else 0.0,
    }


def measure_memory_bandwidth_gbs(size_mb: int = 256, repeats: int = 5) -> float:
    """This machine's copy bandwidth, one thread: bytes read plus written per second, best of `repeats`."""
    import time

    import numpy as np

    src = np.ones(size_mb * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def local_profile(
    bandwidth_gbs: float, gflops: float, memory_gb: float, name: str = "this-machine"
) -> HardwareProfile:
    """A profile of the measuring machine from probed figures, to check estimates against measurements."""
    return HardwareProfile(name, "the measuring machine (probed)", "cpu", bandwidth_gbs, gflops, memory_gb,
                           "measured")  # fmt: skip


def as_dict(profile: HardwareProfile) -> dict:
    return asdict(profile)
