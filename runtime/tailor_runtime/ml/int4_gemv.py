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
        BLOCK_K: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for start in range(0, HALF, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < HALF
            ok = row_ok[:, None] & col_ok[None, :]
            byte = tl.load(packed + rows[:, None] * HALF + cols[None, :], mask=ok, other=0x88)
            low = (byte & 0x0F).to(tl.float32) - 8.0
            high = (byte >> 4).to(tl.float32) - 8.0
            group = cols // GROUP
            row_scales = scales + rows[:, None] * (2 * GROUPS_HALF) + group[None, :]
            s_low = tl.load(row_scales, mask=ok, other=0.0).to(tl.float32)
            s_high = tl.load(row_scales + GROUPS_HALF, mask=ok, other=0.0).to(tl.float32)
            x_low = tl.load(x + cols, mask=col_ok, other=0.0).to(tl.float32)
            x_high = tl.load(x + HALF + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += low * s_low * x_low[None, :] + high * s_high * x_high[None, :]
        tl.store(out + rows, tl.sum(acc, axis=1).to(out.dtype.element_ty), mask=row_ok)

    return kernel


@functools.cache
def _op() -> Any:
    """The torch op tailor::int4_gemv around the kernel, autotuned per weight shape on first use (so
    torch.compile and CUDA graphs see one op)."""
    import triton
    from torch.library import triton_op, wrap_triton

    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (4, 8, 16)
        for bk in (128, 256, 512)
        for w in (2, 4)
        for s in (2, 4)
    ]
    kernel = triton.autotune(configs=configs, key=["N", "HALF"])(_kernel())

    @triton_op("tailor::int4_gemv", mutates_args=())
    def int4_gemv(
        packed: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int
    ) -> torch.Tensor:
        n, half = packed.shape
        out = torch.empty(n, dtype=x.dtype, device=x.device)

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        wrap_triton(kernel)[grid](packed, scales, x, out, n, half, half // group_size, GROUP=group_size)
        return out

    return int4_gemv


def int4_gemv(packed: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """out[n] = sum_k W[n, k] x[k] for the packed weight W (see the module docstring); x is [K], contiguous."""
    n, half = packed.shape
    if x.shape != (2 * half,) or not (packed.is_contiguous() and scales.is_contiguous()):
        raise ValueError(
            f"int4_gemv needs contiguous packed [N, K/2], scales and x [K]; got x {tuple(x.shape)}"
        )
    if half % group_size:
        raise ValueError(f"K/2 ({half}) must be a multiple of group_size ({group_size})")
    return _op()(packed, scales, x.contiguous(), group_size)
