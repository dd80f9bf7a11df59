"""The packed 4-bit linear layer against a reference: the float matmul of its dequantized weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tailor_runtime.ml.packed_int4 import (
    PackedInt4Linear,
    dequantize_weight,
    pack_linear_layers,
    quantize_weight,
)


def test_round_trip_is_round_to_nearest_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    packed, scales = quantize_weight(w, group_size=32)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 128) and scales.shape == (48, 8)
    back = dequantize_weight(packed, scales, 32)
    step = scales.repeat_interleave(32, dim=1)
    assert torch.all((back - w).abs() <= step / 2 + 1e-6)
    # Each group's largest magnitude is representable exactly (the scale is set by it).
    assert torch.allclose(
        back.abs().reshape(48, 8, 32).amax(-1), w.abs().reshape(48, 8, 32).amax(-1), atol=1e-5
    )


@pytest.mark.parametrize("rows", [1, 5])
def test_forward_equals_the_dequantized_matmul(rows):
    torch.manual_seed(1)
    linear = nn.Linear(256, 96, bias=True)
    layer = PackedInt4Linear.from_linear(linear, group_size=64)
    x = torch.randn(1, rows, 256)
    reference = nn.functional.linear(x, dequantize_weight(layer.packed, layer.scales, 64), linear.bias)
    out = layer(x)
    assert out.shape == (1, rows, 96)
    assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4)
    # And it is close to the float layer (4-bit rounding only).
    assert torch.nn.functional.cosine_similarity(out.flatten(), linear(x).detach().flatten(), dim=0) > 0.98


@pytest.mark.slow
def test_compiled_gemv_matches_eager():
    torch.manual_seed(2)
    layer = PackedInt4Linear.from_linear(nn.Linear(128, 64, bias=False), group_size=32)
    x = torch.randn(1, 1, 128)
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.allclose(compiled(x), layer(x), atol=1e-4)


def test_pack_linear_layers_skips_the_head_and_odd_widths():
    model = nn.Sequential()
    model.add_module("a", nn.Linear(128, 64))
    model.add_module("odd", nn.Linear(96, 64))
    model.add_module("lm_head", nn.Linear(64, 10))
    assert pack_linear_layers(model, group_size=32) == 1
    assert isinstance(model.a, PackedInt4Linear)
    assert isinstance(model.odd, nn.Linear) and isinstance(model.lm_head, nn.Linear)


def test_width_not_a_multiple_of_two_groups_is_refused():
    with pytest.raises(ValueError, match="multiple of 2 x group_size"):
        quantize_weight(torch.randn(4, 96), group_size=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_gemv_on_a_gpu_equals_the_dequantized_matmul_at_7b_widths():
    """The shapes of a Llama-2-7B decode step, eager and compiled (run through the device tool:
    pytest -m gpu); the Triton kernel also agrees with the inductor reduction it replaces on CUDA."""
    from tailor_runtime.ml import int4_gemv

    assert int4_gemv.available()
    torch.manual_seed(3)
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008), (100, 384)]:
        group = 128 if k % 256 == 0 or k == 11008 else 64
        layer = PackedInt4Linear.from_linear(
            nn.Linear(k, n, bias=False).cuda().to(torch.bfloat16), group_size=group
        )
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        reference = x.float() @ dequantize_weight(layer.packed, layer.scales, group).float().T
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
        reduction = layer._gemv(x.reshape(k))
        for out in (eager, compiled):
            assert out.dtype == torch.bfloat16 and out.shape == (1, 1, n)
            assert torch.allclose(out.float(), reference, atol=2e-2, rtol=2e-2)
        assert torch.allclose(eager.float().reshape(n), reduction.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("k, group", [(172, 4), (172, -1), (256, 64), (4096, -1), (11008, 128)])
def test_values_quantized_elsewhere_are_kept_exactly(k, group):
    """GPTQ/AWQ/RTN values with their own scales: groups that straddle the nibble halves, or one scale
    per row, are stored at a power-of-two group size that fits, with the scales repeated."""
    from tailor_runtime.ml.packed_int4 import packable_group_size

    torch.manual_seed(4)
    n = 8
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scales = torch.rand(n, 1 if group == -1 else k // group) + 0.01
    layer = PackedInt4Linear.from_quantized(q, scales, group)
    stored = packable_group_size(k, group)
    assert layer.group_size == stored and (k // 2) % stored == 0 and stored & (stored - 1) == 0
    expected = q.float() * scales.repeat_interleave(k // scales.shape[1], dim=1)
    assert torch.equal(dequantize_weight(layer.packed, layer.scales, layer.group_size), expected)
    x = torch.randn(1, 1, k)
    assert torch.allclose(layer(x), x @ expected.T, atol=1e-3, rtol=1e-4)


def test_values_outside_four_bits_or_odd_widths_are_refused():
    with pytest.raises(ValueError, match=r"must lie in \[-8, 7\], got \[-8, 8\]"):
        PackedInt4Linear.from_quantized(torch.tensor([[8, -8]]), torch.ones(1, 1), -1)
    with pytest.raises(ValueError, match="odd"):
        PackedInt4Linear.from_quantized(torch.zeros(2, 5, dtype=torch.int8), torch.ones(2, 1), -1)
