"""Batch-1 product of a packed 4-bit weight and one activation row, as a Triton kernel.

Why our own kernel: the int4 kernels available here (torchao's tinygemm, gemlite) and the same product
written as a plain reduction for inductor all reach well under the bf16 path's speed at batch 1 on an
H100 (BENCHMARKS.md, issue 5). A decode step's matrix-vector products are bound by the bytes of the
weights, so the kernel's one job is to stream the packed bytes at full bandwidth: each program owns a
block of output rows, walks their bytes in contiguous, coalesced tiles (one byte = two weights), and keeps
float32 partial sums in registers; nothing dequantized is written to memory.

The layout is packed_int4's: packed uint8 [N, K/2] (low nibble = column j, high nibble = column j + K/2,
each q + 8), scales [N, K/group_size]. `available()` says whether this process can run it (Triton and a
CUDA device); packed_int4 falls back to its inductor reduction otherwise.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel() -> Any:
    """The Triton kernel (defined on first use, so that importing this module needs no Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        packed,
        scales,
        x,
        out,
        N,
        HALF,
        GROUPS_HALF,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,  # groups per tile: a tile is BLOCK_N rows x BLOCK_G * GROUP bytes
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        in_group = tl.arange(0, GROUP)
        acc = tl.zeros((BLOCK_N, BLOCK_G, GROUP), dtype=tl.float32)
        for g0 in range(0, GROUPS_HALF, BLOCK_G):
            groups = g0 + tl.arange(0, BLOCK_G)
            group_ok = groups < GROUPS_HALF
            cols = groups[:, None] * GROUP + in_group[None, :]  # [BLOCK_G, GROUP], contiguous bytes
            ok = row_ok[:, None, None] & group_ok[None, :, None]
            byte = tl.load(packed + rows[:, None, None] * HALF + cols[None, :, :], mask=ok, other=0x88)
            low = (byte & 0x0F).to(tl.float32) - 8.0
            high = (byte >> 4).to(tl.float32) - 8.0
            # One scale per (row, group): loaded once per tile, broadcast over the group in registers.
            scale_at = scales + rows[:, None] * (2 * GROUPS_HALF) + groups[None, :]
            scale_ok = row_ok[:, None] & group_ok[None, :]
            s_low = tl.load(scale_at, mask=scale_ok, other=0.0).to(tl.float32)
            s_high = tl.load(scale_at + GROUPS_HALF, mask=scale_ok, other=0.0).to(tl.float32)
            x_low = tl.load(x + cols, mask=group_ok[:, None], other=0.0).to(tl.float32)
            x_high = tl.load(x + HALF + cols, mask=group_ok[:, None], other=0.0).to(tl.float32)
            acc += (
                low * x_low[None, :, :] * s_low[:, :, None] + high * x_high[None, :, :] * s_high[:, :, None]
            )
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(out + rows, total.to(out.dtype.element_ty), mask=row_ok)

    return kernel


CONFIGS = [  # (BLOCK_N, BLOCK_G, num_warps, num_stages) tried by the autotuner, per weight shape
    (bn, bg, w, st) for bn in (2, 4, 8, 16) for bg in (1, 2, 4) for w in (2, 4, 8) for st in (2, 3)
]


@functools.cache
def register() -> Any:
    """Define the torch op tailor::int4_gemv (autotuned per weight shape on first use). Call it outside
    any torch.compile region; the compiled code then calls torch.ops.tailor.int4_gemv like any op."""
    import triton
    from torch.library import triton_op, wrap_triton

    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_G": bg}, num_warps=w, num_stages=st) for bn, bg, w, st in CONFIGS
    ]
    kernel = triton.autotune(configs=configs, key=["N", "HALF"])(_kernel())

    @triton_op("tailor::int4_gemv", mutates_args=())
    def op(packed: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
        n, half = packed.shape
        out = torch.empty(n, dtype=x.dtype, device=x.device)

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        wrap_triton(kernel)[grid](packed, scales, x, out, n, half, half // group_size, GROUP=group_size)
        return out

    return op


def int4_gemv(packed: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """out[n] = sum_k W[n, k] x[k] for the packed weight W (see the module docstring); x is [K].
    register() must have run (PackedInt4Linear does it when it is built)."""
    n, half = packed.shape
    if x.shape != (2 * half,):
        raise ValueError(f"int4_gemv needs x of shape ({2 * half},); got {tuple(x.shape)}")
    if half % group_size or group_size & (group_size - 1):
        raise ValueError(f"K/2 ({half}) must be a multiple of group_size ({group_size}), a power of two")
    return torch.ops.tailor.int4_gemv(packed, scales, x.contiguous(), group_size)
