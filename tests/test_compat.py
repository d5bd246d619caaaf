"""fp8dispatch.compat: each drop-in name keeps its callers' shapes and scale convention."""

import pytest
import torch

import fp8dispatch
from fp8dispatch import Fp8Tensor, Fp8ValueError, NumericalOverflowError, compat

E4M3 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def reference_backend(sandbox):
    sandbox.env(FP8DISPATCH_BACKEND="reference")


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _bits(t):
    return t.view(torch.uint8)


# --- dequantization-scale names ---------------------------------------------------------------


def test_act_quant_keeps_leading_dims_and_matches_group_quantize():
    x = _randn(2, 3, 384, dtype=torch.bfloat16)
    y, s = compat.act_quant(x)
    assert y.shape == x.shape and y.dtype == E4M3 and s.shape == (2, 3, 3) and s.dtype == torch.float32
    t = fp8dispatch.quantize(x, "group")
    assert torch.equal(_bits(y), _bits(t.data)) and torch.equal(s.reshape(6, 3), t.scale)
    _, s8 = compat.act_quant(x, 128, scale_fmt="ue8m0")
    assert torch.equal(s8, torch.exp2(torch.log2(s8).round()))  # powers of two


def test_per_token_group_quant_fp8_scale_layouts():
    x = _randn(5, 256)
    y, s = compat.per_token_group_quant_fp8(x, 64)
    assert s.shape == (5, 4) and s.is_contiguous()
    y2, s2 = compat.per_token_group_quant_fp8(x, 64, column_major_scales=True)
    assert s2.shape == (5, 4) and s2.stride() == (1, 5)
    assert torch.equal(s, s2) and torch.equal(_bits(y), _bits(y2))


def test_per_block_quant_fp8_and_weight_dequant_invert_each_other():
    w = _randn(300, 200)
    q, s = compat.per_block_quant_fp8(w)
    assert s.shape == (3, 2)
    back = compat.weight_dequant(q, s, dtype=torch.float32)
    assert torch.equal(back, Fp8Tensor(q, s, (128, 128)).dequantize(torch.float32))
    assert compat.weight_dequant(q, s).dtype == torch.bfloat16  # Unsloth's default
    assert compat.weight_dequant(q, s, 128).dtype == torch.get_default_dtype()  # DeepSeek's order


def test_weight_dequant_takes_row_and_single_scales():
    r = fp8dispatch.quantize(_randn(48, 64), "row")
    assert torch.equal(compat.weight_dequant(r.data, r.scale, torch.float32), r.dequantize(torch.float32))
    t = fp8dispatch.quantize(_randn(48, 64), "tensor")
    assert torch.equal(compat.weight_dequant(t.data, t.scale.reshape(()), torch.float32),
                       t.dequantize(torch.float32))
    with pytest.raises(Fp8ValueError, match=r"s: expected \[1, 1\] block scales, \[48, 1\] row scales"):
        compat.weight_dequant(r.data, torch.ones(2, 2))


def test_w8a8_block_fp8_matmul_is_linear_on_the_same_operands():
    x, w = _randn(2, 3, 256, dtype=torch.bfloat16), _randn(192, 256, seed=1)
    A, As = compat.act_quant(x)
    B, Bs = compat.per_block_quant_fp8(w)
    out = compat.w8a8_block_fp8_matmul(A, B, As, Bs, [128, 128])
    assert out.shape == (2, 3, 192) and out.dtype == torch.float16  # vLLM's default output dtype
    want = fp8dispatch.linear(Fp8Tensor(A.reshape(6, 256), As.reshape(6, 2), (1, 128)),
                              Fp8Tensor(B, Bs, (128, 128)), out_dtype=torch.float16)
    assert torch.equal(out.reshape(6, 192), want)


# --- multiplier names (scale = fp8_max / amax) -------------------------------------------------


def test_quantize_fp8_returns_the_multiplier_and_dequantize_fp8_divides_by_it():
    x = _randn(16, 32) * 3
    q, scale = compat.quantize_fp8(x)
    assert q.dtype == E4M3 and scale.shape == () and scale.dtype == torch.float32
    assert torch.isclose(scale, 448 / x.abs().max(), rtol=1e-6)
    assert torch.equal(compat.dequantize_fp8(q, scale, torch.float32),
                       fp8dispatch.quantize(x, "tensor").dequantize(torch.float32))
    assert torch.equal(compat.dequantize_fp8(_bits(q), scale, torch.float32),
                       compat.dequantize_fp8(q, scale, torch.float32))


def test_quantize_fp8_with_a_given_multiplier_scales_by_it():
    x = _randn(8, 32)
    q, scale = compat.quantize_fp8(x, 4.0)  # a power of two: x * 4 and x / 0.25 agree exactly
    assert scale.item() == 4.0
    assert torch.equal(_bits(q), _bits((x * 4).clamp(-448, 448).to(E4M3)))


def test_fp8_gemm_quantizes_high_precision_operands_and_takes_fp8_with_multipliers():
    a, b = _randn(16, 64), _randn(64, 24, seed=1)
    out = compat.fp8_gemm(a, b)
    assert out.shape == (16, 24) and out.dtype == torch.float16
    (qa, sa), (qb, sb) = compat.quantize_fp8(a), compat.quantize_fp8(b)
    from_fp8 = compat.fp8_gemm(qa, qb, sa, sb, output_dtype=torch.float32)
    want = (qa.float() / sa) @ (qb.float() / sb)
    assert torch.allclose(from_fp8, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(from_fp8.half(), out)
    with pytest.raises(Fp8ValueError, match="b_scale: required for FP8 b"):
        compat.fp8_gemm(qa, qb, sa)


def test_overflow_handling_halves_the_multiplier_until_values_fit():
    x = torch.full((4, 8), 96.0)
    q, scale = compat.quantize_fp8_with_overflow_handling(x, 32.0)  # 3072 -> 1536 -> 768 -> 384
    assert scale.item() == 4.0 and q.float().max().item() == 384.0
    with pytest.raises(NumericalOverflowError, match="after halving the multiplier 2 times"):
        compat.quantize_fp8_with_overflow_handling(x, 32.0, max_attempts=2)
    _, auto = compat.quantize_fp8_with_overflow_handling(x)
    assert torch.isclose(auto, torch.tensor(448 / 96))


def test_quantize_fp8_fused_returns_the_scale_and_its_reciprocal():
    x = _randn(8, 64) * 10
    q, scale, scale_inv = compat.quantize_fp8_fused(x)
    q0, scale0 = compat.quantize_fp8(x)
    assert torch.equal(_bits(q), _bits(q0)) and torch.equal(scale, scale0)
    assert torch.equal(scale_inv, fp8dispatch.quantize(x, "tensor").scale.reshape(()))
    assert torch.isclose(scale * scale_inv, torch.tensor(1.0))
