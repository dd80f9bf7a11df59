"""4-bit weight-only linear layers whose batch-1 product compiles into one fused GEMV kernel.

Why our own: at batch 1 a decode step is a chain of matrix-vector products, bound by the bytes of the
weights. The int4 kernels we could use here (torchao's tinygemm, gemlite) are tuned for larger tiles and
reach only ~540 GB/s on an H100 at batch 1, slower end to end than bf16 (BENCHMARKS.md, issue 5). Written
as "unpack, scale, multiply by the activation vector, sum", the product is a plain reduction that
`torch.compile` (inductor) fuses into a single kernel that loads each packed byte once; nothing
dequantized is ever written to memory.

Layout of a [N, K] weight, symmetric round-to-nearest with one scale per group of `group_size` inputs:
  packed  uint8 [N, K/2]: the low nibble holds column j, the high nibble column j + K/2 (each q + 8, q in
          [-8, 7]), so both halves are contiguous runs that line up with the two halves of x;
  scales  [N, K/group_size] in the activation dtype.
With more than one row of activations (prefill), the weight is dequantized and multiplied with F.linear.
On a CUDA device with Triton, the batch-1 product is int4_gemv's kernel instead (BENCHMARKS.md, issue 5,
compares the two on an H100); the reduction remains for other devices.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tailor_runtime.ml import int4_gemv

QMIN, QMAX = -8, 7
# The batch-1 product on CUDA: "triton" (int4_gemv's kernel), "inductor" (the reduction below, which
# torch.compile fuses), or "auto" (triton where it can run).
KERNELS = ("auto", "triton", "inductor")


def quantize_weight(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K/2], scales [N, K/group_size]) of a [N, K] weight (round to nearest)."""
    n, k = weight.shape
    if k % (2 * group_size):
        raise ValueError(f"in_features {k} must be a multiple of 2 x group_size ({2 * group_size})")
    w = weight.float().reshape(n, k // group_size, group_size)
    scales = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / QMAX
    q = torch.clamp(torch.round(w / scales), QMIN, QMAX).reshape(n, k)
    return pack_values(q), scales.squeeze(-1).to(weight.dtype).contiguous()


def pack_values(q: torch.Tensor) -> torch.Tensor:
    """packed uint8 [N, K/2] of signed 4-bit values q [N, K] in [-8, 7] (any integer or float dtype)."""
    n, k = q.shape
    if k % 2:
        raise ValueError(f"in_features {k} must be even to pack two 4-bit values per byte")
    if q.numel() and (q.min() < QMIN or q.max() > QMAX):
        raise ValueError(f"4-bit values must lie in [{QMIN}, {QMAX}], got [{int(q.min())}, {int(q.max())}]")
    u = q.to(torch.int16) + 8
    half = k // 2
    return (u[:, :half] | (u[:, half:] << 4)).to(torch.uint8).contiguous()


def packable_group_size(in_features: int, group_size: int) -> int:
    """The group size the packed layout stores a weight quantized with `group_size` (-1: one scale per
    row) at: the largest power of two dividing both it and K/2, so that no group straddles the two
    nibble halves and the Triton kernel's tile (a power of two) fits. Scales are repeated to match, so
    the values are unchanged; 0 when K is odd (nothing fits)."""
    if in_features % 2:
        return 0
    span = math.gcd(in_features if group_size == -1 else group_size, in_features // 2)
    return span & -span  # the lowest set bit: the largest power of two dividing span


def dequantize_weight(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The [N, K] weight the packed form stands for, in the scales' dtype."""
    n = packed.shape[0]
    q = torch.cat([packed & 0x0F, packed >> 4], dim=1).to(torch.int16) - 8
    w = q.reshape(n, -1, group_size).to(scales.dtype) * scales.unsqueeze(-1)
    return w.reshape(n, -1)


def reduction_gemv(
    packed: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int
) -> torch.Tensor:
    """W x for the packed W and one row x [K], written as one reduction for inductor to fuse (float32)."""
    # One reduction over [N, K/2 / g, g] whose every element uses both nibbles of one packed byte:
    # the low one against the first half of x, the high one against the second. So each byte is
    # loaded once, and inductor fuses the unpacking and scaling into the loads (float32 accumulation).
    n, half = packed.shape
    groups = half // group_size
    low = ((packed & 0x0F).to(torch.int16) - 8).reshape(n, groups, group_size).float()
    high = ((packed >> 4).to(torch.int16) - 8).reshape(n, groups, group_size).float()
    s = scales.float()
    s_low = s[:, :groups].unsqueeze(-1)
    s_high = s[:, groups:].unsqueeze(-1)
    xf = x.float()
    x_low = xf[:half].reshape(1, groups, group_size)
    x_high = xf[half:].reshape(1, groups, group_size)
    return (low * s_low * x_low + high * s_high * x_high).sum(dim=(1, 2))


class PackedInt4Linear(nn.Module):
    """A Linear with 4-bit packed weights (see the module docstring for the layout)."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
        kernel: str = "auto",
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
        power_of_two = group_size & (group_size - 1) == 0
        if kernel == "auto":
            kernel = "triton" if int4_gemv.available() and power_of_two else "inductor"
        if kernel == "triton" and not power_of_two:
            raise ValueError(f"the triton kernel needs a power-of-two group size, not {group_size}")
        if kernel == "triton":
            int4_gemv.register()  # here, not in forward: torch.compile must not trace the op's definition
        self.kernel = kernel
        self.out_features, half = packed.shape
        self.in_features = 2 * half
        self.group_size = group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_quantized(
        cls,
        q: torch.Tensor,
        scales: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
        kernel: str = "auto",
    ) -> PackedInt4Linear:
        """The layer for a weight already quantized elsewhere (GPTQ, AWQ, RTN from llm-compressor):
        signed values q [N, K] in [-8, 7] and scales [N, K/group_size] ([N, 1] or group_size -1: one
        per row). The weight it stands for, q * scale, is kept exactly (see packable_group_size)."""
        n, k = q.shape
        stored = packable_group_size(k, group_size)
        if not stored:
            raise ValueError(f"in_features {k} is odd: the packed layout needs an even width")
        scales = scales.reshape(n, -1)
        repeat = k // stored // scales.shape[1]
        if repeat * scales.shape[1] * stored != k:
            raise ValueError(
                f"scales {tuple(scales.shape)} do not fit a [{n}, {k}] weight in groups of {group_size}"
            )
        return cls(pack_values(q), scales.repeat_interleave(repeat, dim=1).contiguous(), bias, stored, kernel)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, kernel: str = "auto") -> PackedInt4Linear:
        packed, scales = quantize_weight(linear.weight.detach(), group_size)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(packed, scales, bias, group_size, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features:  # one row: the fused GEMV
            row = x.reshape(self.in_features)
            if x.is_cuda and self.kernel == "triton":
                out = int4_gemv.int4_gemv(self.packed, self.scales, row, self.group_size)
            else:
                out = self._gemv(row).to(x.dtype)
            out = out.reshape(*x.shape[:-1], self.out_features)
        else:
            weight = dequantize_weight(self.packed, self.scales, self.group_size)
            out = torch.nn.functional.linear(x, weight.to(x.dtype))
        return out if self.bias is None else out + self.bias

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        return reduction_gemv(self.packed, self.scales, x, self.group_size)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, kernel={self.kernel}"
        )


def pack_linear_layers(
    model: nn.Module, group_size: int = 128, skip: tuple[str, ...] = ("lm_head",), kernel: str = "auto"
) -> int:
    """Replace every nn.Linear (except the names in `skip`) whose width fits the group size by a
    PackedInt4Linear, in place; returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or any(full.endswith(s) for s in skip):
                continue
            if child.in_features % (2 * group_size):
                continue
            setattr(module, child_name, PackedInt4Linear.from_linear(child, group_size, kernel))
            replaced += 1
    return replaced


def packed_bytes(model: Any) -> int:
    """Bytes of parameters and buffers (packed weights count at their packed size)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
