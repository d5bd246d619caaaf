"""matmul and linear through the public API on the reference backend: recipes, shapes, options."""

import pytest
import torch

import fp8dispatch
from fp8dispatch import Fp8Tensor
from fp8dispatch.numerics import relative_error

REF = dict(backend="reference")


def exact(a: Fp8Tensor, b: Fp8Tensor):
    return a.dequantize(torch.float32).reshape(-1, a.shape[-1]) @ b.dequantize(torch.float32)


@pytest.mark.parametrize("recipe, a_block, b_block", [
    ("block", (1, 128), (128, 128)), ("row", (1, 200), (200, 1)), ("tensor", (33, 200), (200, 72)),
])
def test_recipes_quantize_high_precision_inputs(recipe, a_block, b_block):
    a, w = torch.randn(33, 200), torch.randn(72, 200)
    out = fp8dispatch.matmul(a, w.t(), recipe=recipe, out_dtype=torch.float32, **REF)
    qa = fp8dispatch.quantize(a, "block", block_size=a_block, **REF)
    qb = fp8dispatch.quantize(w, "block", block_size=(b_block[1], b_block[0]), **REF).t()
    assert qa.block == a_block and qb.block == b_block
    assert torch.equal(out, exact(qa, qb))
    assert relative_error(out, a @ w.t()) < 2e-3


def test_fp8_operands_fix_the_recipe_and_the_other_side_follows():
    x, w = torch.randn(16, 256), torch.randn(64, 256)
    wq = fp8dispatch.quantize(w, "row", **REF)
    out = fp8dispatch.linear(x, wq, out_dtype=torch.float32, **REF)
    xq = fp8dispatch.quantize(x, "row", **REF)
    assert torch.equal(out, exact(xq, wq.t()))
    with pytest.raises(fp8dispatch.Fp8ValueError, match="recipe"):
        fp8dispatch.linear(x, wq, recipe="block", **REF)


def test_batch_dims_bias_and_out_dtypes():
    x, w, bias = torch.randn(2, 3, 256), torch.randn(48, 256), torch.randn(48)
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = fp8dispatch.linear(x, w, bias, out_dtype=out_dtype, **REF)
        assert out.shape == (2, 3, 48) and out.dtype == out_dtype
        plain = fp8dispatch.linear(x, w, out_dtype=torch.float32, **REF)
        assert torch.equal(out, (plain + bias).to(out_dtype))


def test_linear_defaults_to_the_input_dtype():
    x = torch.randn(4, 128, dtype=torch.float16)
    assert fp8dispatch.linear(x, torch.randn(16, 128), **REF).dtype == torch.float16


def test_empty_inputs_give_empty_or_zero_results():
    w = torch.randn(16, 128)
    assert fp8dispatch.linear(torch.randn(0, 128), w, **REF).shape == (0, 16)
    zero_k = fp8dispatch.matmul(torch.randn(4, 0), torch.randn(0, 8), bias=torch.ones(8), **REF)
    assert zero_k.shape == (4, 8) and (zero_k == 1).all()
    empty = fp8dispatch.quantize(torch.randn(0, 128), "group", **REF)
    assert empty.shape == (0, 128) and empty.scale.shape == (0, 1)


def test_fp8_times_fp8_with_mismatched_k_blocks_is_refused():
    a = fp8dispatch.quantize(torch.randn(4, 256), "group", block_size=64, **REF)
    b = fp8dispatch.quantize(torch.randn(32, 256), "block", **REF).t()
    with pytest.raises(fp8dispatch.Fp8ValueError, match="K blocks must line up"):
        fp8dispatch.matmul(a, b, **REF)


def test_repeated_calls_reuse_the_plan_and_give_the_same_bits():
    x, w = torch.randn(8, 256), torch.randn(32, 256)
    first = fp8dispatch.linear(x, w, **REF)
    assert torch.equal(first, fp8dispatch.linear(x, w, **REF))
